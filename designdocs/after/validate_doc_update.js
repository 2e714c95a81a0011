/*
 * The task contract, enforced inside CouchDB for every writer.
 * Every refusal is {forbidden: "<field>: <rule>"} so that a client sees a 403
 * whose reason names the field and the rule. The statuses and transitions
 * come from lib/rules.json, the one table the Python side reads too.
 *
 * Who may do what comes from the same table, through userCtx.roles: clients
 * (rules.roles.client) create tasks and make the "client" moves, workers
 * (rules.roles.worker) make the "worker" moves and alone write the fields in
 * rules.worker_fields and worker records; server admins ("_admin") may do what
 * either may, and alone may edit a final task, by writing rules.force_field: true.
 * Anybody else cannot write tasks at all (401 when anonymous, 403 otherwise).
 *
 * Replication between servers writes each document's latest revision as the
 * source has it: a task the target never saw arrives done, a task it saw waiting
 * arrives after several moves. Apache CouchDB validates those revisions too, so a
 * replication runs as a user with rules.roles.replicator, whose writes are checked
 * for shape only: the moves were checked where they were made. The role is never
 * implied, not even for server admins, whose writes keep every rule.
 */
function validate_doc_update(newDoc, oldDoc, userCtx, secObj) {
  var rules = require('lib/rules');

  function refuse(reason) {
    throw ({forbidden: reason});
  }

  function isTask(doc) {
    return doc.type === undefined || doc.type === 'task';
  }

  function isRecord(doc) {
    return doc.type === 'worker';
  }

  var userRoles = userCtx.roles || [];
  var isAdmin = userRoles.indexOf('_admin') >= 0;

  // role is 'worker' or 'client'; a server admin has every role.
  function hasRole(role) {
    return isAdmin || userRoles.indexOf(rules.roles[role]) >= 0;
  }

  function roleName(role) {
    return role + 's (role ' + rules.roles[role] + ')';
  }

  // Tasks are written by clients, workers and server admins only.
  function checkTaskWriter() {
    if (hasRole('client') || hasRole('worker')) {
      return;
    }
    var who = userCtx.name === null || userCtx.name === undefined ? 'an anonymous request' :
      'user "' + userCtx.name + '" (roles: ' + (userRoles.length ? userRoles.join(', ') : 'none') + ')';
    var reason = 'role: only ' + roleName('client') + ' and ' + roleName('worker') +
      ' may write tasks; ' + who + ' has neither';
    if (userCtx.name === null || userCtx.name === undefined) {
      throw ({unauthorized: reason});
    }
    refuse(reason);
  }

  // The fields the worker owns (rules.worker_fields): a client may send them
  // back as it read them (compared as JSON), never set, change or drop them.
  function checkWorkerFields(doc, before) {
    if (hasRole('worker')) {
      return;
    }
    before = before || {};
    for (var i = 0; i < rules.worker_fields.length; i++) {
      var field = rules.worker_fields[i];
      if (!sameJSON(doc[field], before[field])) {
        refuse(field + ': only ' + roleName('worker') + ' may write ' + field +
               ', a field the worker owns (send it back as you read it)');
      }
    }
  }

  // The worker-owned fields have the shapes the worker writes (rules.worker_field_types),
  // so that no writer, a worker-role user included, can leave a task a worker cannot read.
  function checkWorkerFieldShapes(doc) {
    var types = rules.worker_field_types;
    for (var field in types) {
      if (!owns(types, field) || doc[field] === undefined) {
        continue;
      }
      var value = doc[field], type = types[field], ok;
      if (type === 'count') {
        ok = typeof value === 'number' && value % 1 === 0 && value >= 0;
      } else if (type === 'array') {
        ok = Array.isArray(value);
      } else if (type === 'object') {
        ok = isObject(value);
      } else {
        ok = typeof value === type;
      }
      if (!ok) {
        refuse(field + ': must be ' + (type === 'count' ? 'a whole number of at least 0' : type === 'object' || type === 'array' ? 'an ' + type : 'a ' + type) +
               ' (a field the worker writes)');
      }
    }
  }

  // The force flag marks a server admin's edit of a final task (an audit trail).
  function checkForce(doc, before) {
    var field = rules.force_field;
    if (!isAdmin && !sameJSON(doc[field], (before || {})[field])) {
      refuse(field + ': only server admins may force-edit a final task ("' + field + '": true)');
    }
  }

  // A worker record: one per worker instance, renewed on a heartbeat (after/records.py).
  function checkRecord(doc) {
    if (typeof doc.name !== 'string' || !new RegExp(rules.patterns.worker).test(doc.name)) {
      refuse('name: a worker record needs the worker name');
    }
    if (typeof doc.instance !== 'string' || doc.instance.indexOf(doc.name + '@') !== 0) {
      refuse('instance: a worker record needs an instance id starting with "' + doc.name + '@"');
    }
    if (doc._id !== rules.record_prefix + doc.instance) {
      refuse('_id: a worker record is stored as "' + rules.record_prefix + '<instance>"');
    }
    if (doc.lease_until !== undefined) {
      checkDate('lease_until', doc.lease_until);
    }
  }

  // A document may have a field named "hasOwnProperty": never call it on the object.
  function owns(object, key) {
    return Object.prototype.hasOwnProperty.call(object, key);
  }

  // How deep a JSON value nests, counted up to `limit` (so never deeper than that).
  function deeperThan(value, limit) {
    if (typeof value !== 'object' || value === null) {
      return false;
    }
    if (limit === 0) {
      return true;
    }
    for (var key in value) {
      if (owns(value, key) && deeperThan(value[key], limit - 1)) {
        return true;
      }
    }
    return false;
  }

  // Do two documents agree on every field but the ones named?
  function sameExcept(a, b, ignored) {
    var key, keys = {};
    for (key in a) { if (owns(a, key)) { keys[key] = true; } }
    for (key in b) { if (owns(b, key)) { keys[key] = true; } }
    for (key in keys) {
      if (ignored.indexOf(key) < 0 && !sameJSON(a[key], b[key])) {
        return false;
      }
    }
    return true;
  }

  // The same JSON value (a JSON document holds no NaN, so === implies it).
  function sameJSON(a, b) {
    return a === b || JSON.stringify(a) === JSON.stringify(b);
  }

  function isObject(value) {
    return typeof value === 'object' && value !== null && !Array.isArray(value);
  }

  function checkDate(field, value) {
    if (typeof value !== 'string') {
      refuse(field + ': must be an ISO 8601 date string such as "2026-12-01T09:30:00Z"');
    }
    var m = value.match(new RegExp(rules.patterns.date));
    if (!m) {
      refuse(field + ': "' + value + '" is not an ISO 8601 date (YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS[.ffffff]][Z|+HH:MM])');
    }
    var year = +m[1], month = +m[2], day = +m[3];
    if (year < 1000 || year > 9998) {
      refuse(field + ': "' + value + '" is out of range (years 1000 to 9998)');
    }
    var probe = new Date(Date.UTC(year, month - 1, day));
    if (month < 1 || month > 12 || probe.getUTCDate() !== day || probe.getUTCMonth() !== month - 1) {
      refuse(field + ': "' + value + '" is not a real calendar date');
    }
    if (m[4] !== undefined && (+m[4] > 23 || +m[5] > 59 || (m[6] !== undefined && +m[6] > 59))) {
      refuse(field + ': "' + value + '" has an hour, minute or second out of range');
    }
    if (m[8] && m[8] !== 'Z' && (+m[8].slice(1, 3) > 23 || +m[8].slice(4, 6) > 59)) {
      refuse(field + ': "' + value + '" has a UTC offset out of range');
    }
  }

  // PouchDB Server JSON-parses query values (?worker=1.0 reaches the filter as
  // the number 1), so a name that reads as JSON must read back as itself, or
  // the worker "1.0" would follow the tasks of the worker "1" and never its own.
  function readsBackAsItself(name) {
    var value;
    try {
      value = JSON.parse(name);
    } catch (e) {
      return true;
    }
    return String(value) === name;
  }

  // A status the table does not know (a document written before these rules
  // were deployed, or under an older table): no worker holds such a document.
  function knownStatus(doc) {
    return rules.statuses.indexOf(doc.status) >= 0;
  }

  function checkDuration(field, value) {
    if (typeof value !== 'string' || !new RegExp(rules.patterns.duration).test(value)) {
      refuse(field + ': must be an ISO 8601 duration such as "PT30S", "PT1H" or "P1D" (got ' +
             JSON.stringify(value) + ')');
    }
  }

  function checkOnly(field, value, allowed) {
    for (var key in value) {
      if (owns(value, key) && allowed.indexOf(key) < 0) {
        refuse(field + '.' + key + ': unknown field (allowed: ' + allowed.join(', ') + ')');
      }
    }
  }

  function isCount(value, min, max) {
    return typeof value === 'number' && value % 1 === 0 && value >= min && value <= max;
  }

  var SCHEDULE_FIELDS = ['repeat', 'misfire', 'overlap', 'retry', 'timeout'];  // checkSchedule's

  // The optional scheduling fields: their shape here, their full meaning in the
  // worker (after/recurrence.py, after/retry.py), which puts a task it cannot
  // schedule into err with the reason.
  function checkSchedule(doc) {
    var repeat = doc.repeat, misfire = doc.misfire, retry = doc.retry;
    if (repeat !== undefined) {
      if (!isObject(repeat)) {
        refuse('repeat: must be an object such as {"cron": "*/5 * * * *"} or {"interval": "PT1H"}');
      }
      checkOnly('repeat', repeat, ['cron', 'interval', 'timezone', 'limit', 'until']);
      if ((repeat.cron === undefined) === (repeat.interval === undefined)) {
        refuse('repeat: needs exactly one of cron or interval');
      }
      if (repeat.cron !== undefined) {
        var fields = typeof repeat.cron === 'string' ? repeat.cron.trim().split(/\s+/) : [];
        var macro = fields.length === 1 && new RegExp(rules.patterns.cron_macro).test(fields[0]);
        if (!macro && (fields.length < 5 || fields.length > 6)) {
          refuse('repeat.cron: must be a cron expression of 5 fields (minute hour day month weekday) ' +
                 'or 6 (with seconds), got ' + JSON.stringify(repeat.cron));
        }
        for (var i = 0; !macro && i < fields.length; i++) {
          if (!new RegExp(rules.patterns.cron_field).test(fields[i])) {
            refuse('repeat.cron: field ' + (i + 1) + ' ' + JSON.stringify(fields[i]) + ' has characters a cron field cannot have');
          }
        }
      }
      if (repeat.interval !== undefined) {
        checkDuration('repeat.interval', repeat.interval);
      }
      if (repeat.timezone !== undefined &&
          (typeof repeat.timezone !== 'string' || !new RegExp(rules.patterns.timezone).test(repeat.timezone))) {
        refuse('repeat.timezone: must be an IANA time zone name such as "Europe/Paris" (got ' +
               JSON.stringify(repeat.timezone) + ')');
      }
      if (repeat.limit !== undefined && !isCount(repeat.limit, 1, 1e9)) {
        refuse('repeat.limit: must be a whole number of runs, at least 1');
      }
      if (repeat.until !== undefined) {
        checkDate('repeat.until', repeat.until);
      }
    }
    if (misfire !== undefined) {
      var policy = isObject(misfire) ? misfire.policy : misfire;
      if (isObject(misfire)) {
        checkOnly('misfire', misfire, ['policy', 'grace']);
        if (misfire.grace !== undefined) {
          checkDuration('misfire.grace', misfire.grace);
        }
      }
      if (rules.misfire_policies.indexOf(policy) < 0) {
        refuse('misfire: must be one of ' + rules.misfire_policies.join(', ') +
               ' or {"policy": ..., "grace": "PT30S"} (got ' + JSON.stringify(misfire) + ')');
      }
    }
    if (doc.overlap !== undefined && rules.overlap_policies.indexOf(doc.overlap) < 0) {
      refuse('overlap: must be one of ' + rules.overlap_policies.join(', '));
    }
    if (retry !== undefined) {
      if (!isObject(retry)) {
        refuse('retry: must be an object such as {"limit": 3, "delay": "PT30S"}');
      }
      checkOnly('retry', retry, ['limit', 'delay', 'backoff', 'max_delay', 'jitter']);
      if (!isCount(retry.limit, 0, 1000)) {
        refuse('retry.limit: must be a whole number of retries from 0 to 1000');
      }
      if (retry.delay !== undefined) {
        checkDuration('retry.delay', retry.delay);
      }
      if (retry.max_delay !== undefined) {
        checkDuration('retry.max_delay', retry.max_delay);
      }
      if (retry.backoff !== undefined && (typeof retry.backoff !== 'number' || !(retry.backoff >= 1))) {
        refuse('retry.backoff: must be a number of at least 1');
      }
      if (retry.jitter !== undefined && typeof retry.jitter !== 'boolean') {
        refuse('retry.jitter: must be true or false');
      }
    }
    if (doc.timeout !== undefined) {
      checkDuration('timeout', doc.timeout);
    }
  }

  // The fields of a task as written. `stored` is the revision it updates, if that was
  // checked when written (a task under these rules): a field it has unchanged is not
  // checked again. The worker's moves change none of them, and CouchDB runs this
  // function for every document written, so this is most writes' quick path.
  function checkTask(doc, stored) {
    if (!stored || doc.worker !== stored.worker) {
      checkWorker(doc.worker);
    }
    if (!stored || doc.date !== stored.date) {
      checkDate('date', doc.date);
    }
    if (!stored || !sameJSON(doc.job, stored.job)) {
      checkJob(doc.job);
    }
    for (var i = 0; i < SCHEDULE_FIELDS.length; i++) {
      if (!stored || !sameJSON(doc[SCHEDULE_FIELDS[i]], stored[SCHEDULE_FIELDS[i]])) {
        checkSchedule(doc);
        break;
      }
    }
    if (rules.statuses.indexOf(doc.status) < 0) {
      refuse('status: must be one of ' + rules.statuses.join(', ') + ' (got ' + JSON.stringify(doc.status) + ')');
    }
  }

  function checkWorker(worker) {
    if (typeof worker !== 'string' || !new RegExp(rules.patterns.worker).test(worker)) {
      refuse('worker: must be a worker name of 1 to 64 letters, digits, "_", "-" or "." (not first)');
    }
    if (!readsBackAsItself(worker)) {
      refuse('worker: "' + worker + '" is read as ' + String(JSON.parse(worker)) +
             ' in a query string (?worker=...); write it that way or choose a name that is not a number');
    }
  }

  function checkJob(job) {
    if (!isObject(job)) {
      refuse('job: must be an object {"name": ..., "arguments": [...]}');
    }
    if (typeof job.name !== 'string' || !new RegExp(rules.patterns.job_name).test(job.name) ||
        job.name.indexOf('__') === 0) {
      refuse('job.name: must be a job module name: an identifier of letters, digits and "_", not starting with a digit or "__"');
    }
    if (job.arguments !== undefined && !Array.isArray(job.arguments)) {
      refuse('job.arguments: must be a JSON array of positional arguments');
    }
    if (deeperThan(job.arguments, rules.max_depth)) {
      refuse('job.arguments: nested deeper than ' + rules.max_depth + ' levels');
    }
  }

  if (newDoc._id.indexOf('_design/') === 0) {
    return;  // only server admins can write design documents at all
  }

  if (userRoles.indexOf(rules.roles.replicator) >= 0) {
    if (newDoc._deleted) {
      return;  // deleted where it was made (a final task, a conflict's loser, a record)
    }
    if (isRecord(newDoc)) {
      return checkRecord(newDoc);
    }
    if (!isTask(newDoc)) {
      refuse('type: unknown document type ' + JSON.stringify(newDoc.type));
    }
    checkTask(newDoc);
    checkWorkerFieldShapes(newDoc);
    return;
  }

  if (newDoc._deleted) {
    if (oldDoc && isRecord(oldDoc) && !hasRole('worker')) {
      refuse('type: only workers (role ' + rules.roles.worker + ') may delete worker records');
    }
    if (newDoc.resolves_conflict === true && hasRole('worker')) {
      return;  // a worker deletes the losing revision of a conflict (after/tasks.py resolve_conflict)
    }
    if (!oldDoc || isTask(oldDoc)) {
      checkTaskWriter();
    }
    if (oldDoc && isTask(oldDoc) && knownStatus(oldDoc) && rules.deletable.indexOf(oldDoc.status) < 0) {
      refuse('status: a ' + oldDoc.status + ' task cannot be deleted; set status to "cancel" to stop it ' +
             '(only ' + rules.deletable.join(', ') + ' tasks may be deleted)');
    }
    return;
  }

  if (isRecord(newDoc)) {
    if (oldDoc && !oldDoc._deleted && !isRecord(oldDoc)) {
      refuse('type: a ' + (oldDoc.type || 'task') + ' document cannot become a worker record');
    }
    if (!hasRole('worker')) {
      refuse('type: only workers (role ' + rules.roles.worker + ') may write worker records');
    }
    checkRecord(newDoc);
    return;
  }
  if (!isTask(newDoc)) {
    refuse('type: unknown document type ' + JSON.stringify(newDoc.type) + ' (tasks have no type or type "task"; worker records are written by workers)');
  }
  if (oldDoc && !oldDoc._deleted && !isTask(oldDoc)) {
    refuse('type: a ' + oldDoc.type + ' document cannot become a task');
  }

  checkTaskWriter();
  var before = oldDoc && !oldDoc._deleted ? oldDoc : null;
  checkTask(newDoc, before && knownStatus(before) ? before : null);
  checkForce(newDoc, before);
  if (!before || !knownStatus(oldDoc)) {  // a new task, or one written anew
    if (newDoc.status !== rules.initial) {
      refuse('status: a new task must start as "' + rules.initial + '" (got "' + newDoc.status + '")');
    }
    checkWorkerFields(newDoc, before);
    checkWorkerFieldShapes(newDoc);
    return;
  }

  var from = oldDoc.status, to = newDoc.status;
  if (rules.final.indexOf(from) >= 0) {
    if (isAdmin && newDoc[rules.force_field] === true) {
      return;  // a server admin's forced edit; the document keeps "force": true
    }
    if (hasRole('worker') && sameExcept(newDoc, oldDoc, ['_rev', '_revisions', 'conflicts_resolved']) &&
        !sameJSON(newDoc.conflicts_resolved, oldDoc.conflicts_resolved)) {
      return;  // a worker records the conflicting revisions it resolved (after/tasks.py)
    }
    refuse('status: a ' + from + ' task cannot change (' + from + ' is final); only a server admin ' +
           'may force an edit, by writing "' + rules.force_field + '": true');
  }
  if (from !== to && !owns(rules.transitions[from], to)) {
    var allowed = Object.keys(rules.transitions[from]);
    refuse('status: cannot change from ' + from + ' to ' + to + ' (from ' + from + ' only to ' +
           (allowed.length ? allowed.join(', ') : 'nothing') + ')');
  }
  if (from !== to && !hasRole(rules.transitions[from][to])) {
    refuse('status: only ' + roleName(rules.transitions[from][to]) + ' may change a task from ' +
           from + ' to ' + to);
  }
  checkWorkerFields(newDoc, oldDoc);
  checkWorkerFieldShapes(newDoc);
  if (from !== rules.initial &&
      (newDoc.worker !== oldDoc.worker || !sameJSON(newDoc.job, oldDoc.job))) {
    refuse('worker, job: can change only while a task is waiting (create a new task instead)');
  }
  if (newDoc.date !== oldDoc.date && from !== rules.initial && from !== 'reschedule' &&
      to !== 'reschedule' && to !== rules.initial) {
    refuse('date: a ' + from + ' task keeps its date; set status to "reschedule" with the new date');
  }
}
