/*
 * After's dashboard: plain JavaScript, no build step, no dependency.
 *
 * Served by the database itself (/<db>/_design/after/index.html). It reads
 * counts and lists from the design document's views (by_status, by_worker),
 * worker records from _all_docs, and stays live by following the changes feed
 * with longpoll requests, each with a client-side deadline (PouchDB Server
 * ignores `timeout` and would keep a request open forever). Every action is an
 * ordinary document write, so validate_doc_update judges it as it judges any
 * client, and a refusal shows the server's own reason.
 *
 * Text from documents is only ever set with textContent (never as HTML), and
 * nothing here needs inline scripts or styles, so a strict Content-Security-
 * Policy (default-src 'self') does not break the page.
 */
(function () {
  'use strict';

  var blocked = document.getElementById('script-blocked');
  if (blocked) blocked.hidden = true;

  // -- where we are ------------------------------------------------------------------------
  var path = location.pathname;
  var at = path.indexOf('/_design/');
  var DB = at >= 0 ? path.slice(0, at) : '/tasks';
  var ROOT = DB.slice(0, DB.lastIndexOf('/') + 1);
  var DB_NAME = decodeURIComponent(DB.slice(ROOT.length));
  var DDOC = at >= 0 ? decodeURIComponent(path.slice(at + 9).split('/')[0]) : 'after';

  var FEED_DEADLINE_MS = 35000; // longer than the server-side timeout we ask for (25 s)
  var REFRESH_EVERY_MS = 15000; // late tasks become late by the clock alone
  var LIST_LIMIT = 25;
  var CHART_MINUTES = 30;
  var LATE_STATUSES = ['waiting', 'scheduled', 'reschedule'];

  // Used until the design document's lib/rules.json is read (tests/test_dashboard.py
  // keeps this copy equal to it).
  var DEFAULT_RULES = {
    statuses: ['waiting', 'scheduled', 'running', 'reschedule', 'cancel', 'canceled', 'done', 'err'],
    transitions: {
      waiting: {scheduled: 'worker', running: 'worker', cancel: 'client', reschedule: 'client'},
      scheduled: {running: 'worker', waiting: 'worker', reschedule: 'client', cancel: 'client'},
      reschedule: {scheduled: 'worker', waiting: 'worker'},
      cancel: {canceled: 'worker'},
      running: {done: 'worker', err: 'worker', waiting: 'worker', cancel: 'client'},
      err: {reschedule: 'client'},
      done: {},
      canceled: {}
    },
    record_prefix: 'after-worker:'
  };

  var state = {
    rules: DEFAULT_RULES,
    session: null,
    seq: null,
    counts: {},
    byWorker: {},
    late: [],
    lateCount: 0,
    upcoming: [],
    failed: [],
    holdings: {},
    instances: {},
    tasks: {},
    runs: {},
    activity: [],
    workers: {},
    jobs: {}
  };

  var $ = function (id) { return document.getElementById(id); };

  // -- DOM helpers ------------------------------------------------------------------------------
  function h(tag, attrs) {
    var el = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (key) {
        var value = attrs[key];
        if (value === undefined || value === null || value === false) return;
        if (key === 'class') el.className = value;
        else if (key === 'text') el.textContent = value;
        else if (key.slice(0, 2) === 'on') el.addEventListener(key.slice(2), value);
        else el.setAttribute(key, value === true ? '' : value);
      });
    }
    for (var i = 2; i < arguments.length; i++) append(el, arguments[i]);
    return el;
  }

  function append(el, child) {
    if (child === undefined || child === null || child === false) return;
    if (Array.isArray(child)) child.forEach(function (c) { append(el, c); });
    else el.appendChild(typeof child === 'object' ? child : document.createTextNode(String(child)));
  }

  var SVG_NS = 'http://www.w3.org/2000/svg';
  function s(tag, attrs, text) {
    var el = document.createElementNS(SVG_NS, tag);
    Object.keys(attrs || {}).forEach(function (key) { el.setAttribute(key, attrs[key]); });
    if (text !== undefined) el.textContent = text;
    return el;
  }

  // -- formatting ------------------------------------------------------------------------------
  function pad(n) { return (n < 10 ? '0' : '') + n; }

  function fmtAge(ms) {
    var sec = Math.max(0, Math.round(ms / 1000));
    if (sec < 60) return sec + 's';
    var min = Math.floor(sec / 60);
    if (min < 60) return min + 'm ' + pad(sec % 60) + 's';
    var hours = Math.floor(min / 60);
    if (hours < 48) return hours + 'h ' + pad(min % 60) + 'm';
    return Math.floor(hours / 24) + 'd ' + (hours % 24) + 'h';
  }

  function fmtDuration(ms) {
    if (typeof ms !== 'number' || !isFinite(ms)) return '—';
    if (ms < 1) return ms.toFixed(2) + ' ms';
    if (ms < 1000) return (ms < 10 ? ms.toFixed(1) : Math.round(ms)) + ' ms';
    if (ms < 60000) return (ms / 1000).toFixed(ms < 10000 ? 2 : 1) + ' s';
    return fmtAge(ms);
  }

  function fmtTime(ms) {
    if (!isFinite(ms)) return '—';
    var d = new Date(ms);
    var now = new Date();
    var time = pad(d.getHours()) + ':' + pad(d.getMinutes()) + ':' + pad(d.getSeconds());
    if (d.toDateString() === now.toDateString()) return time;
    return d.getFullYear() + '-' + pad(d.getMonth() + 1) + '-' + pad(d.getDate()) + ' ' + time.slice(0, 5);
  }

  function timeEl(ms) {
    if (!isFinite(ms)) return h('span', {class: 'muted', text: '—'});
    var iso = new Date(ms).toISOString();
    return h('time', {datetime: iso, title: iso, class: 'nowrap', text: fmtTime(ms)});
  }

  // A live "3m 04s ago" / "in 2m" / "late by 5s" that tick() keeps current.
  function relEl(ms, mode) {
    return h('span', {class: 'rel nowrap' + (mode === 'late' ? ' late-by' : ''), 'data-at': ms, 'data-mode': mode},
      relText(ms, mode));
  }

  function relText(ms, mode) {
    var diff = Date.now() - ms;
    if (mode === 'late') return 'late by ' + fmtAge(diff);
    if (mode === 'age') return fmtAge(diff) + ' ago';
    return diff > 0 ? 'due ' + fmtAge(diff) + ' ago' : 'in ' + fmtAge(-diff);
  }

  function isoNow(offsetMs) {
    return new Date(Date.now() + (offsetMs || 0)).toISOString().replace(/\.\d{3}Z$/, 'Z');
  }

  // The task date as milliseconds, read as the views read it: a date alone is midnight
  // UTC, no offset means UTC.
  function dueOf(doc) {
    if (typeof doc.date !== 'string') return NaN;
    var date = doc.date.replace(' ', 'T').replace(/(\.\d{3})\d+/, '$1');
    if (date.length === 10) date += 'T00:00:00';
    if (!/(Z|[+-]\d\d:\d\d)$/.test(date)) date += 'Z';
    return Date.parse(date);
  }

  function msOf(value) {
    return typeof value === 'string' ? Date.parse(value) : NaN;
  }

  function jobName(doc) {
    return doc.job && typeof doc.job.name === 'string' ? doc.job.name : '?';
  }

  function argsText(doc) {
    var args = doc.job && doc.job.arguments;
    if (args === undefined || (Array.isArray(args) && !args.length)) return '';
    var text = JSON.stringify(args);
    return text.length > 80 ? text.slice(0, 77) + '…' : text;
  }

  function chip(status) {
    return h('span', {class: 'chip s-' + status, text: status});
  }

  // -- HTTP ----------------------------------------------------------------------------------
  function HttpError(status, error, reason) {
    this.name = 'HttpError';
    this.status = status;
    this.error = error;
    this.reason = reason;
    this.message = status + ' ' + error + ': ' + reason;
  }
  HttpError.prototype = Object.create(Error.prototype);

  var inFlight = 0;

  function http(method, url, body, options) {
    options = options || {};
    inFlight += 1;
    var controller = new AbortController();
    var timeout = options.timeout === undefined ? 30000 : options.timeout;
    var timer = timeout ? setTimeout(function () { controller.abort(); }, timeout) : null;
    if (options.signal) {
      if (options.signal.aborted) controller.abort();
      options.signal.addEventListener('abort', function () { controller.abort(); });
    }
    var headers = {Accept: 'application/json'};
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    return fetch(url, {
      method: method,
      headers: headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: 'same-origin',
      cache: 'no-store',
      signal: controller.signal
    }).then(function (response) {
      return response.text().then(function (text) {
        var data;
        try {
          data = text.trim() ? JSON.parse(text) : {};
        } catch (e) {
          data = {error: 'bad_response', reason: text.slice(0, 200)};
        }
        if (!response.ok) {
          throw new HttpError(response.status, String(data.error || 'http_error'),
                              String(data.reason || response.statusText || ''));
        }
        return data;
      });
    }).finally(function () {
      inFlight -= 1;
      if (timer) clearTimeout(timer);
    });
  }

  function q(params) {
    return Object.keys(params).map(function (key) {
      var value = params[key];
      if (['key', 'startkey', 'endkey', 'keys'].indexOf(key) >= 0) value = JSON.stringify(value);
      return encodeURIComponent(key) + '=' + encodeURIComponent(String(value));
    }).join('&');
  }

  function view(name, params) {
    return http('GET', DB + '/_design/' + encodeURIComponent(DDOC) + '/_view/' + name + '?' + q(params));
  }

  function docUrl(id) {
    return DB + '/' + encodeURIComponent(id);
  }

  // -- notices ---------------------------------------------------------------------------------
  var noticeTimer = null;
  function notice(text, kind) {
    var el = $('notice');
    el.textContent = text;
    el.className = 'notice' + (kind ? ' ' + kind : '');
    el.hidden = false;
    clearTimeout(noticeTimer);
    if (kind !== 'error') noticeTimer = setTimeout(function () { el.hidden = true; }, 8000);
  }

  function refusal(error) {
    if (error instanceof HttpError) {
      if (error.status === 403 || error.status === 401) return 'Refused by the server: ' + error.reason;
      if (error.status === 409) return 'Conflict: the task changed since the page read it.';
      return 'The server answered ' + error.status + ' ' + error.error + ': ' + error.reason;
    }
    return 'The server could not be reached (' + (error && error.message || error) + ').';
  }

  function setLive(mode, text) {
    var el = $('live');
    el.setAttribute('data-state', mode);
    $('live-text').textContent = text;
  }

  // -- session (CouchDB cookie authentication) ---------------------------------------------------
  function loadSession() {
    return http('GET', ROOT + '_session').then(function (data) {
      state.session = data.userCtx || {name: null, roles: []};
      renderSession();
    }, function () {
      state.session = {name: null, roles: []};
      renderSession();
    });
  }

  function renderSession() {
    var user = state.session || {name: null, roles: []};
    var roles = user.roles || [];
    var who = $('who');
    who.replaceChildren();
    if (user.name) {
      append(who, ['Logged in as ', h('strong', {text: user.name}),
        roles.length ? h('span', {class: 'muted', text: ' (' + roles.join(', ') + ')'}) : null]);
      $('login-box').hidden = true;
      $('logout').hidden = false;
    } else if (roles.indexOf('_admin') >= 0) {
      append(who, [h('span', {class: 'party', text: 'Admin party'}),
        ' no login needed: anyone who can reach this server may read and change everything']);
      $('login-box').hidden = false;
      $('login-summary').textContent = 'Log in as a user';
      $('logout').hidden = true;
    } else {
      append(who, 'Not logged in');
      $('login-box').hidden = false;
      $('login-summary').textContent = 'Log in';
      $('logout').hidden = true;
    }
  }

  function login(event) {
    event.preventDefault();
    var name = $('login-name').value;
    var password = $('login-password').value;
    $('login-error').textContent = '';
    http('POST', ROOT + '_session', {name: name, password: password}).then(function () {
      $('login-password').value = '';
      $('login-box').open = false;
      return loadSession();
    }).then(function () {
      notice('Logged in as ' + name + '.', 'ok');
      restart();
    }, function (error) {
      $('login-error').textContent = error instanceof HttpError ? error.reason || error.error : refusal(error);
    });
  }

  // The server renews the session cookie on the responses of authenticated requests,
  // so a request still in flight could log us back in: stop the feed, let the
  // others finish, end the session and check that it is gone.
  function logout() {
    generation += 1;
    if (feedController) feedController.abort();
    setLive('connecting', 'logging out…');
    var attempts = 0;
    function end() {
      return whenIdle().then(function () {
        return http('DELETE', ROOT + '_session').catch(function () { /* already gone */ });
      }).then(function () {
        return http('GET', ROOT + '_session');
      }).then(function (data) {
        if (data.userCtx && data.userCtx.name && ++attempts < 4) return end();
        return null;
      });
    }
    end().catch(function () { /* shown by loadSession below */ }).then(loadSession).then(function () {
      notice('Logged out.', 'ok');
      restart();
    });
  }

  function whenIdle() {
    return new Promise(function (resolve) {
      var waited = 0;
      (function check() {
        if (inFlight <= 0 || waited >= 3000) resolve();
        else { waited += 50; setTimeout(check, 50); }
      })();
    });
  }

  // -- the rules (lib/rules.json, as deployed in the design document) ---------------------------
  function loadRules() {
    return http('GET', DB + '/_design/' + encodeURIComponent(DDOC)).then(function (ddoc) {
      var source = ddoc.lib && ddoc.lib.rules;
      if (typeof source === 'string') {
        var json = source.replace(/^\s*module\.exports\s*=\s*/, '').replace(/;\s*$/, '');
        state.rules = JSON.parse(json);
      }
    }).catch(function () { /* keep the built-in copy */ });
  }

  function clientMay(status, to) {
    var next = state.rules.transitions[status];
    return !!(next && next[to] === 'client');
  }

  // -- loading -----------------------------------------------------------------------------------
  var generation = 0;
  var feedController = null;

  function start() {
    $('db-name').textContent = DB_NAME;
    document.title = 'After — ' + DB_NAME;
    bindForms();
    loadSession().then(restart);
    setInterval(tick, 1000);
    var resizeTimer = null;
    window.addEventListener('resize', function () {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(renderChart, 150);
    });
    setInterval(function () { scheduleRefresh(0); }, REFRESH_EVERY_MS);
  }

  // (Re)load everything and follow the changes feed from the sequence read first,
  // so that nothing changed between the reads and the feed is missed.
  function restart() {
    generation += 1;
    var mine = generation;
    if (feedController) feedController.abort();
    setLive('connecting', 'connecting…');
    http('GET', DB).then(function (info) {
      if (mine !== generation) return null;
      state.seq = info.update_seq;
      return loadRules().then(function () {
        return Promise.all([refresh(), backfillRuns()]);
      }).then(function () {
        if (mine !== generation) return;
        $('main').hidden = false;
        render();
        follow(mine);
      });
    }).catch(function (error) {
      if (mine !== generation) return;
      setLive('retrying', 'not connected');
      if (error instanceof HttpError && (error.status === 401 || error.status === 403)) {
        notice('Log in to see the tasks of ' + DB_NAME + ' (' + error.reason + ').', 'error');
        $('login-box').open = true;
        $('main').hidden = true;
      } else if (error instanceof HttpError && error.status === 404) {
        notice('The database ' + DB_NAME + ' or its design document is missing: run `after push`. (' +
               error.reason + ')', 'error');
      } else {
        notice(refusal(error) + ' Retrying…', 'error');
        setTimeout(function () { if (mine === generation) restart(); }, 5000);
      }
    });
  }

  var refreshing = false;
  var refreshAgain = false;
  var refreshTimer = null;

  function scheduleRefresh(delay) {
    if (refreshTimer) return;
    refreshTimer = setTimeout(function () {
      refreshTimer = null;
      if (refreshing) { refreshAgain = true; return; }
      refresh().catch(function (error) { notice(refusal(error), 'error'); });
    }, delay === undefined ? 250 : delay);
  }

  function rowsDocs(result) {
    return (result.rows || []).map(function (row) { return row.doc; }).filter(Boolean);
  }

  function refresh() {
    refreshing = true;
    var now = new Date().toISOString();
    var lateQueries = LATE_STATUSES.map(function (st) {
      return Promise.all([
        view('by_status', {reduce: false, include_docs: true, startkey: [st], endkey: [st, now], limit: LIST_LIMIT}),
        view('by_status', {reduce: true, startkey: [st], endkey: [st, now]})
      ]);
    });
    var upcomingQueries = LATE_STATUSES.map(function (st) {
      return view('by_status', {reduce: false, include_docs: true, startkey: [st, now], endkey: [st, {}], limit: LIST_LIMIT});
    });
    var heldQueries = ['scheduled', 'running'].map(function (st) {
      return view('by_status', {reduce: false, include_docs: true, startkey: [st], endkey: [st, {}], limit: 500});
    });
    var prefix = state.rules.record_prefix || 'after-worker:';
    return Promise.all([
      view('by_status', {group_level: 1}),
      view('by_worker', {group_level: 2}),
      Promise.all(lateQueries),
      Promise.all(upcomingQueries),
      view('by_status', {reduce: false, include_docs: true, descending: true,
                         startkey: ['err', {}], endkey: ['err'], limit: LIST_LIMIT}),
      Promise.all(heldQueries),
      http('GET', DB + '/_all_docs?' + q({include_docs: true, startkey: prefix, endkey: prefix + '\ufff0'}))
    ]).then(function (results) {
      state.counts = {};
      results[0].rows.forEach(function (row) { state.counts[row.key[0]] = row.value; });

      state.byWorker = {};
      results[1].rows.forEach(function (row) {
        var worker = row.key[0];
        (state.byWorker[worker] = state.byWorker[worker] || {})[row.key[1]] = row.value;
        state.workers[worker] = true;
      });

      var late = [];
      state.lateCount = 0;
      results[2].forEach(function (pair) {
        late = late.concat(rowsDocs(pair[0]));
        state.lateCount += pair[1].rows.length ? pair[1].rows[0].value : 0;
      });
      state.late = late.sort(byDue).slice(0, LIST_LIMIT);

      var upcoming = [];
      results[3].forEach(function (result) { upcoming = upcoming.concat(rowsDocs(result)); });
      state.upcoming = upcoming.sort(byDue).slice(0, LIST_LIMIT);

      state.failed = rowsDocs(results[4]).sort(function (a, b) {
        return (msOf(b.finished_at) || dueOf(b)) - (msOf(a.finished_at) || dueOf(a));
      });

      state.holdings = {};
      results[5].forEach(function (result) {
        rowsDocs(result).forEach(function (doc) {
          if (!doc.owner) return;
          (state.holdings[doc.owner] = state.holdings[doc.owner] || []).push(doc);
        });
      });

      state.instances = {};
      results[6].rows.forEach(function (row) {
        if (row.doc && row.doc.type === 'worker') state.instances[row.id] = row.doc;
      });

      [state.late, state.upcoming, state.failed].forEach(function (docs) {
        docs.forEach(remember);
      });
      render();
    }).finally(function () {
      refreshing = false;
      if (refreshAgain) {
        refreshAgain = false;
        scheduleRefresh();
      }
    });
  }

  function byDue(a, b) { return dueOf(a) - dueOf(b); }

  // The latest version of a task the page has seen: what an action writes back.
  function remember(doc) {
    var known = state.tasks[doc._id];
    if (!known || revNumber(doc._rev) >= revNumber(known._rev)) state.tasks[doc._id] = doc;
    if (typeof doc.worker === 'string') state.workers[doc.worker] = true;
    if (doc.job && typeof doc.job.name === 'string') state.jobs[doc.job.name] = true;
    noteRun(doc);
  }

  function revNumber(rev) { return parseInt(String(rev || '0').split('-')[0], 10) || 0; }

  // Recent runs and the chart start from the latest changes (newest first), then
  // grow from the live feed.
  function backfillRuns() {
    return http('GET', DB + '/_changes?' + q({descending: true, limit: 500, include_docs: true}))
      .then(function (data) {
        (data.results || []).forEach(function (row) {
          if (row.doc && !row.deleted && isTask(row.doc)) remember(row.doc);
        });
      })
      .catch(function () { /* the chart starts empty and fills from the feed */ });
  }

  function isTask(doc) {
    return doc._id.indexOf('_design/') !== 0 && (doc.type === undefined || doc.type === 'task');
  }

  function noteRun(doc) {
    var finished = msOf(doc.finished_at);
    if (!isFinite(finished) || ['done', 'err', 'canceled', 'waiting'].indexOf(doc.status) < 0) return;
    var key = doc._id + '@' + doc.finished_at;
    if (state.runs[key]) return;
    var started = msOf(doc.started_at);
    var due = dueOf(doc);
    var outcome = doc.error ? 'err' : (doc.status === 'canceled' ? 'canceled' : 'done');
    state.runs[key] = {
      id: doc._id,
      job: jobName(doc),
      worker: doc.worker,
      outcome: outcome,
      finished: finished,
      started: started,
      duration: typeof doc.duration_ms === 'number' ? doc.duration_ms : NaN,
      // A repeating task moves its date to the next occurrence after a run.
      delay: doc.status !== 'waiting' && isFinite(started) && isFinite(due) ? Math.max(0, started - due) : NaN,
      attempt: doc.attempt,
      error: doc.error
    };
    var keys = Object.keys(state.runs);
    if (keys.length > 3000) {
      keys.sort(function (a, b) { return state.runs[a].finished - state.runs[b].finished; });
      keys.slice(0, keys.length - 3000).forEach(function (k) { delete state.runs[k]; });
    }
  }

  // -- the changes feed ---------------------------------------------------------------------------
  function follow(mine) {
    var backoff = 1000;
    function next() {
      if (mine !== generation) return;
      var controller = new AbortController();
      feedController = controller;
      var timedOut = false;
      var deadline = setTimeout(function () { timedOut = true; controller.abort(); }, FEED_DEADLINE_MS);
      var url = DB + '/_changes?feed=longpoll&include_docs=true&timeout=25000&limit=200&since=' +
        encodeURIComponent(String(state.seq));
      http('GET', url, undefined, {signal: controller.signal, timeout: 0}).then(function (data) {
        clearTimeout(deadline);
        if (mine !== generation) return;
        setLive('live', 'live');
        backoff = 1000;
        (data.results || []).forEach(onChange);
        if (data.last_seq !== undefined && data.last_seq !== null) state.seq = data.last_seq;
        next();
      }, function (error) {
        clearTimeout(deadline);
        if (mine !== generation) return;
        if (timedOut) { next(); return; } // nothing changed for a while: ask again
        setLive('retrying', 'reconnecting…');
        if (error instanceof HttpError && (error.status === 401 || error.status === 403)) {
          notice('The changes feed was refused (' + error.reason + '): log in again.', 'error');
          $('login-box').open = true;
        }
        setTimeout(next, backoff);
        backoff = Math.min(backoff * 2, 30000);
      });
    }
    setLive('live', 'live');
    next();
  }

  function onChange(row) {
    if (row.id.indexOf('_design/') === 0) {
      if (row.id === '_design/' + DDOC) loadRules().then(function () { scheduleRefresh(); });
      return;
    }
    if (row.deleted) {
      delete state.tasks[row.id];
      if (state.instances[row.id]) {
        delete state.instances[row.id];
        renderInstances();
      }
      addActivity({_id: row.id}, 'deleted');
      scheduleRefresh();
      return;
    }
    var doc = row.doc;
    if (!doc) { scheduleRefresh(); return; }
    if (doc.type === 'worker') {
      state.instances[doc._id] = doc;
      renderInstances();
      return;
    }
    if (!isTask(doc)) return;
    remember(doc);
    addActivity(doc, doc.status);
    scheduleRefresh();
  }

  function addActivity(doc, status) {
    state.activity.unshift({at: Date.now(), doc: doc, status: status});
    state.activity = state.activity.slice(0, 40);
    renderActivity(true);
  }

  // -- rendering --------------------------------------------------------------------------------
  // Tables are rebuilt on every change: keep the keyboard focus on the same button
  // and the tracebacks someone opened.
  var openTraces = {};

  function render() {
    var active = document.activeElement;
    var focus = active && active.getAttribute && active.getAttribute('data-id') ?
      {id: active.getAttribute('data-id'), action: active.getAttribute('data-action'),
       table: active.closest('table') && active.closest('table').id} : null;
    renderAll();
    ['late', 'upcoming', 'failed', 'instances', 'workers', 'runs'].forEach(function (id) { labelCells($(id)); });
    if (focus && focus.table && document.activeElement === document.body) {
      var selector = '#' + focus.table + ' [data-id="' + CSS.escape(focus.id) + '"]' +
        (focus.action ? '[data-action="' + focus.action + '"]' : '.task-link');
      var again = document.querySelector(selector);
      if (again) again.focus();
    }
  }

  function renderAll() {
    renderCounts();
    renderTaskTable($('late'), state.late, 'late');
    renderTaskTable($('upcoming'), state.upcoming, 'upcoming');
    renderFailed();
    renderInstances();
    renderWorkers();
    renderRuns();
    renderChart();
    renderActivity(false);
    renderDatalists();
    $('late-count').textContent = state.lateCount ? String(state.lateCount) : '';
    $('failed-count').textContent = state.counts.err ? String(state.counts.err) : '';
  }

  function renderCounts() {
    var list = $('counts');
    list.replaceChildren();
    var total = 0;
    state.rules.statuses.forEach(function (st) { total += state.counts[st] || 0; });
    append(list, h('li', {}, h('span', {class: 'n', text: total}), h('span', {class: 'label', text: 'all tasks'})));
    append(list, h('li', {class: 'late s-late' + (state.lateCount ? ' has-late' : ''), 'data-status': 'late'},
      h('span', {class: 'n', text: state.lateCount}), h('span', {class: 'label', text: 'late'})));
    state.rules.statuses.forEach(function (st) {
      append(list, h('li', {class: 's-' + st, 'data-status': st},
        h('span', {class: 'n', text: state.counts[st] || 0}), h('span', {class: 'label', text: st})));
    });
  }

  function head(table, columns) {
    var tr = h('tr');
    columns.forEach(function (col) {
      append(tr, h('th', {scope: 'col', class: col.num ? 'num' : null, text: col.label || col}));
    });
    table.replaceChildren(h('thead', {}, tr));
    var body = h('tbody');
    table.appendChild(body);
    return body;
  }

  // Each cell carries its column's name, which the narrow (phone) layout shows
  // beside the value when a table row becomes a card.
  function labelCells(table) {
    var labels = Array.prototype.map.call(table.querySelectorAll('thead th'), function (th) {
      return th.textContent;
    });
    Array.prototype.forEach.call(table.querySelectorAll('tbody tr'), function (tr) {
      Array.prototype.forEach.call(tr.children, function (cell, index) {
        if (!labels[index] || cell.classList.contains('empty')) return;
        cell.setAttribute('data-label', labels[index]);
        if (!(cell.childNodes.length === 1 && cell.firstChild.className === 'cell')) {
          var box = h('div', {class: 'cell'});
          while (cell.firstChild) box.appendChild(cell.firstChild);
          cell.appendChild(box);
        }
      });
    });
  }

  function emptyRow(body, columns, text) {
    append(body, h('tr', {}, h('td', {class: 'empty', colspan: columns, text: text})));
  }

  function taskCell(doc) {
    var args = argsText(doc);
    return h('td', {},
      h('button', {type: 'button', class: 'task-link', 'data-id': doc._id,
                   title: 'Show the document ' + doc._id, onclick: function () { showDoc(doc._id); }},
        jobName(doc)),
      args ? h('div', {class: 'args mono', text: args}) : null);
  }

  function actionsCell(doc) {
    var cell = h('td', {class: 'actions-cell'});
    var box = h('div', {class: 'actions'});
    var label = jobName(doc) + ' ' + doc._id;
    if (clientMay(doc.status, 'cancel')) {
      append(box, h('button', {type: 'button', class: 'danger small', 'data-action': 'cancel', 'data-id': doc._id,
        'aria-label': 'Cancel task ' + label, onclick: function () { openAction('cancel', doc._id); }}, 'Cancel'));
    }
    if (clientMay(doc.status, 'reschedule')) {
      var retry = doc.status === 'err';
      append(box, h('button', {type: 'button', class: 'secondary small',
        'data-action': retry ? 'retry' : 'reschedule', 'data-id': doc._id,
        'aria-label': (retry ? 'Retry task ' : 'Reschedule task ') + label,
        onclick: function () { openAction(retry ? 'retry' : 'reschedule', doc._id); }}, retry ? 'Retry' : 'Reschedule'));
    }
    append(cell, box);
    return cell;
  }

  function renderTaskTable(table, docs, kind) {
    var columns = ['Task', 'Worker', 'Status', kind === 'late' ? 'Was due' : 'Due', 'Repeat', 'Actions'];
    var body = head(table, columns);
    if (!docs.length) {
      emptyRow(body, columns.length, kind === 'late' ? 'Nothing is late.' : 'Nothing is scheduled.');
      return;
    }
    docs.forEach(function (doc) {
      var due = dueOf(doc);
      append(body, h('tr', {'data-id': doc._id, 'data-status': doc.status},
        taskCell(doc),
        h('td', {class: 'nowrap', text: doc.worker}),
        h('td', {}, chip(doc.status), doc.owner ? h('div', {class: 'muted mono', text: shortOwner(doc.owner)}) : null),
        h('td', {}, timeEl(due), h('div', {}, relEl(due, kind === 'late' ? 'late' : 'due'))),
        h('td', {}, repeatCell(doc)),
        actionsCell(doc)));
    });
  }

  function shortOwner(owner) {
    return owner.length > 40 ? owner.slice(0, 37) + '…' : owner;
  }

  function repeatCell(doc) {
    var repeat = doc.repeat;
    if (!repeat || typeof repeat !== 'object') return h('span', {class: 'muted', text: 'once'});
    var text = repeat.interval ? 'every ' + repeat.interval : 'cron ' + repeat.cron;
    if (repeat.timezone) text += ' (' + repeat.timezone + ')';
    var next = nextOccurrences(doc, 3);
    return h('span', {},
      h('span', {class: 'mono', text: text}),
      next.length ? h('span', {class: 'repeat', text: 'next: ' + next.map(fmtTime).join(', ')}) : null);
  }

  function renderFailed() {
    var table = $('failed');
    var columns = ['Task', 'Worker', 'Finished', 'Attempt', 'Error', 'Actions'];
    var body = head(table, columns);
    if (!state.failed.length) {
      emptyRow(body, columns.length, 'No failed task.');
      return;
    }
    state.failed.forEach(function (doc) {
      var error = doc.error || {};
      var message = (error.type ? error.type + ': ' : '') + (error.message || '(no message)');
      append(body, h('tr', {'data-id': doc._id, 'data-status': doc.status},
        taskCell(doc),
        h('td', {class: 'nowrap', text: doc.worker}),
        h('td', {}, timeEl(msOf(doc.finished_at))),
        h('td', {class: 'num', text: doc.attempt === undefined ? '—' : doc.attempt}),
        h('td', {},
          h('div', {class: 'error-text', text: message}),
          error.traceback ? h('details', {class: 'trace', open: !!openTraces[doc._id],
                                          ontoggle: function (event) { openTraces[doc._id] = event.target.open; }},
                              h('summary', {text: 'traceback'}), h('pre', {text: error.traceback})) : null),
        actionsCell(doc)));
    });
  }

  function instanceState(record) {
    var now = Date.now();
    var lease = msOf(record.lease_until);
    if (record.state === 'running') return isFinite(lease) && lease > now ? 'live' : 'stale';
    return record.state || '?';
  }

  function renderInstances() {
    var table = $('instances');
    var columns = ['Instance', 'State', 'Heartbeat', 'Holds', {label: 'Done', num: true}, {label: 'Failed', num: true}];
    var body = head(table, columns);
    var records = Object.keys(state.instances).map(function (id) { return state.instances[id]; });
    records.sort(function (a, b) {
      return (instanceState(a) === 'live' ? 0 : 1) - (instanceState(b) === 'live' ? 0 : 1) ||
        String(a.instance).localeCompare(String(b.instance));
    });
    if (!records.length) {
      emptyRow(body, columns.length, 'No worker has written a record yet: start one with `after start NAME`.');
      return;
    }
    setTimeout(function () { labelCells(table); }, 0);
    records.forEach(function (record) {
      var st = instanceState(record);
      var held = state.holdings[record.instance] || [];
      var seen = msOf(record.last_seen);
      var holds = h('td', {},
        h('span', {text: (record.held !== undefined ? record.held : held.length) + ' held'}),
        held.length ? h('ul', {class: 'held-list'}, held.slice(0, 5).map(function (doc) {
          return h('li', {}, h('span', {text: jobName(doc) + ' '}), chip(doc.status));
        }), held.length > 5 ? h('li', {class: 'muted', text: '+' + (held.length - 5) + ' more'}) : null) : null);
      append(body, h('tr', {'data-instance': record.instance, 'data-state': st},
        h('td', {}, h('strong', {text: record.name}),
          h('div', {class: 'muted mono', text: (record.host || '?') + ' · pid ' + (record.pid || '?')}),
          h('div', {class: 'muted mono', title: record.instance, text: shortOwner(String(record.instance))})),
        h('td', {}, h('span', {class: 'chip ' + (st === 'live' ? 's-done' : st === 'stale' || st === 'lost' ? 's-err' : 's-canceled'), text: st})),
        h('td', {}, isFinite(seen) ? relEl(seen, 'age') : h('span', {class: 'muted', text: 'never'})),
        holds,
        h('td', {class: 'num', text: record.done === undefined ? '—' : record.done}),
        h('td', {class: 'num', text: record.failed === undefined ? '—' : record.failed})));
    });
  }

  function renderWorkers() {
    var table = $('workers');
    var columns = ['Worker', 'Tasks', {label: 'Total', num: true}];
    var body = head(table, columns);
    var names = Object.keys(state.byWorker).sort();
    if (!names.length) {
      emptyRow(body, columns.length, 'No task yet.');
      return;
    }
    names.forEach(function (name) {
      var counts = state.byWorker[name];
      var total = 0;
      var chips = h('div', {class: 'actions'});
      state.rules.statuses.forEach(function (st) {
        if (!counts[st]) return;
        total += counts[st];
        append(chips, h('span', {class: 'chip s-' + st, text: counts[st] + ' ' + st}));
      });
      append(body, h('tr', {'data-worker': name},
        h('th', {scope: 'row', text: name}), h('td', {}, chips), h('td', {class: 'num', text: total})));
    });
  }

  function recentRuns() {
    return Object.keys(state.runs).map(function (k) { return state.runs[k]; })
      .sort(function (a, b) { return b.finished - a.finished; });
  }

  function renderRuns() {
    var table = $('runs');
    var columns = ['Finished', 'Task', 'Worker', 'Outcome', {label: 'Duration', num: true}, {label: 'Start delay', num: true}];
    var body = head(table, columns);
    var runs = recentRuns().slice(0, 15);
    if (!runs.length) {
      emptyRow(body, columns.length, 'No run yet.');
      return;
    }
    runs.forEach(function (run) {
      append(body, h('tr', {'data-id': run.id},
        h('td', {}, timeEl(run.finished)),
        h('td', {}, h('button', {type: 'button', class: 'task-link', onclick: function () { showDoc(run.id); }}, run.job)),
        h('td', {class: 'nowrap', text: run.worker}),
        h('td', {}, chip(run.outcome)),
        h('td', {class: 'num', text: fmtDuration(run.duration)}),
        h('td', {class: 'num', text: fmtDuration(run.delay)})));
    });
  }

  function renderActivity(fresh) {
    var list = $('activity');
    list.replaceChildren();
    if (!state.activity.length) {
      append(list, h('li', {class: 'muted', text: 'Waiting for changes…'}));
      return;
    }
    state.activity.forEach(function (entry, index) {
      var doc = entry.doc;
      append(list, h('li', {class: fresh && index === 0 ? 'new' : null},
        timeEl(entry.at),
        entry.status === 'deleted' ? h('span', {class: 'chip s-canceled', text: 'deleted'}) : chip(entry.status),
        h('span', {text: doc.job ? jobName(doc) + ' · ' + doc.worker : doc._id})));
    });
  }

  function renderDatalists() {
    var workers = $('known-workers');
    workers.replaceChildren();
    Object.keys(state.workers).sort().forEach(function (name) { append(workers, h('option', {value: name})); });
    var jobs = $('known-jobs');
    jobs.replaceChildren();
    Object.keys(state.jobs).sort().forEach(function (name) { append(jobs, h('option', {value: name})); });
  }

  // -- the chart: runs per minute and the worst start delay, as inline SVG ------------------------
  function renderChart() {
    // Drawn at the size it is shown, so that its text stays readable on a phone.
    var width = Math.max(300, Math.min(1000, Math.round($('chart').clientWidth || 640)));
    var height = width < 500 ? 170 : 200, left = 34, right = 46, top = 22, bottom = 24;
    var minute = 60000;
    var end = Math.floor(Date.now() / minute) * minute + minute;
    var startAt = end - CHART_MINUTES * minute;
    var buckets = [];
    for (var i = 0; i < CHART_MINUTES; i++) buckets.push({done: 0, err: 0, delays: []});
    var totalRuns = 0, failedRuns = 0, delays = [];
    recentRuns().forEach(function (run) {
      if (run.finished < startAt || run.finished >= end) return;
      var b = buckets[Math.floor((run.finished - startAt) / minute)];
      if (run.outcome === 'err') { b.err += 1; failedRuns += 1; } else { b.done += 1; }
      totalRuns += 1;
      if (isFinite(run.delay)) { b.delays.push(run.delay); delays.push(run.delay); }
    });
    var maxRuns = evenMax(Math.max.apply(null, buckets.map(function (b) { return b.done + b.err; }).concat([1])));
    // The delay scale in seconds: at least 10 ms, and 1 s while there is nothing to show.
    // Minutes whose worst delay is more than ten times the median minute's (a task dated
    // years ago, run today) would flatten every other point: the scale is capped below
    // them, and they are drawn at its top, marked, and counted in the caption.
    var worsts = buckets.filter(function (b) { return b.delays.length; })
      .map(function (b) { return Math.max.apply(null, b.delays); });
    var sortedWorsts = worsts.slice().sort(function (a, b) { return a - b; });
    var medianWorst = sortedWorsts.length ? sortedWorsts[Math.floor((sortedWorsts.length - 1) / 2)] : 0;
    var onScale = worsts.filter(function (w) { return w <= 10 * Math.max(medianWorst, 10); });
    var offScale = worsts.length - onScale.length;
    var maxDelay = (onScale.length ? niceMax(Math.max(10, Math.max.apply(null, onScale))) : 1000) / 1000;
    var plotW = width - left - right, plotH = height - top - bottom;
    var barW = plotW / CHART_MINUTES;

    var median = delays.length ? delays.slice().sort(function (a, b) { return a - b; })[Math.floor(delays.length / 2)] : NaN;
    var worst = delays.length ? Math.max.apply(null, delays) : NaN;
    var summary = totalRuns + ' run' + (totalRuns === 1 ? '' : 's') + ' in the last ' + CHART_MINUTES + ' minutes' +
      (failedRuns ? ', ' + failedRuns + ' failed' : '') +
      (delays.length ? '; start delay: median ' + fmtDuration(median) + ', worst ' + fmtDuration(worst) : '') +
      (offScale ? '; delay scale capped at ' + fmtSeconds(maxDelay) + ', ' + offScale + ' minute' +
        (offScale === 1 ? '' : 's') + ' above it (▲)' : '');

    var svg = s('svg', {viewBox: '0 0 ' + width + ' ' + height, role: 'img', 'aria-label': summary});
    svg.appendChild(s('title', {}, 'Runs per minute and worst start delay'));
    for (var g = 0; g <= 2; g++) {
      var y = top + plotH - (plotH * g) / 2;
      svg.appendChild(s('line', {class: 'grid-line', x1: left, x2: width - right, y1: y, y2: y}));
      svg.appendChild(s('text', {class: 'axis', x: left - 6, y: y + 3, 'text-anchor': 'end'}, String(Math.round(maxRuns * g / 2))));
      svg.appendChild(s('text', {class: 'axis', x: width - right + 6, y: y + 3}, fmtSeconds(maxDelay * g / 2)));
    }
    buckets.forEach(function (b, index) {
      var x = left + index * barW + 1;
      var doneH = (b.done / maxRuns) * plotH;
      var errH = (b.err / maxRuns) * plotH;
      if (b.done) svg.appendChild(s('rect', {class: 'bar-done', x: x, width: Math.max(1, barW - 2), y: top + plotH - doneH, height: doneH, rx: 1.5}));
      if (b.err) svg.appendChild(s('rect', {class: 'bar-err', x: x, width: Math.max(1, barW - 2), y: top + plotH - doneH - errH, height: errH, rx: 1.5}));
    });
    var points = [];
    buckets.forEach(function (b, index) {
      if (!b.delays.length) return;
      var worstHere = Math.max.apply(null, b.delays) / 1000;
      points.push([left + index * barW + barW / 2, top + plotH - Math.min(1, worstHere / maxDelay) * plotH,
                   worstHere > maxDelay]);
    });
    if (points.length > 1) {
      svg.appendChild(s('polyline', {class: 'late-line', points: points.map(function (p) { return p[0].toFixed(1) + ',' + p[1].toFixed(1); }).join(' ')}));
    }
    points.forEach(function (p) {
      if (p[2]) {  // above the capped scale: a triangle at its top
        var tri = [[p[0], p[1] - 4], [p[0] - 4, p[1] + 3], [p[0] + 4, p[1] + 3]];
        svg.appendChild(s('polygon', {class: 'late-off', points: tri.map(function (q) { return q.join(','); }).join(' ')}));
      } else {
        svg.appendChild(s('circle', {class: 'late-dot', cx: p[0], cy: p[1], r: 2.5}));
      }
    });
    [[0, '−' + CHART_MINUTES + ' min'], [CHART_MINUTES / 2, '−' + CHART_MINUTES / 2 + ' min'], [CHART_MINUTES, 'now']].forEach(function (tick) {
      svg.appendChild(s('text', {class: 'axis', x: left + tick[0] * barW, y: height - 6,
        'text-anchor': tick[0] === 0 ? 'start' : tick[0] === CHART_MINUTES ? 'end' : 'middle'}, tick[1]));
    });
    svg.appendChild(s('text', {class: 'axis', x: 2, y: 10}, 'runs / min'));
    svg.appendChild(s('text', {class: 'axis', x: width - 2, y: 10, 'text-anchor': 'end'},
      offScale ? 'worst delay (capped)' : 'worst delay'));
    $('chart').replaceChildren(svg);
    $('chart-caption').textContent = summary + '.';
    var durations = [];
    recentRuns().forEach(function (run) {
      if (run.finished >= startAt && isFinite(run.duration)) durations.push(run.duration);
    });
    durations.sort(function (a, b) { return a - b; });
    var stats = $('chart-stats');
    stats.replaceChildren();
    [['runs', String(totalRuns)],
     ['failed', String(failedRuns)],
     ['per minute', (totalRuns / CHART_MINUTES).toFixed(1)],
     ['median duration', durations.length ? fmtDuration(durations[Math.floor(durations.length / 2)]) : '—'],
     ['median start delay', fmtDuration(median)],
     ['worst start delay', fmtDuration(worst)]].forEach(function (pair) {
      append(stats, h('div', {}, h('dt', {text: pair[0]}), h('dd', {text: pair[1]})));
    });
  }

  // A scale top whose half is a whole number too (0, 2, 4 / 0, 5, 10 / 0, 10, 20 ...).
  function evenMax(value) {
    var steps = [2, 4, 6, 10, 20, 40, 60, 100, 200, 400, 600, 1000, 2000, 4000, 6000, 10000];
    for (var i = 0; i < steps.length; i++) if (value <= steps[i]) return steps[i];
    return niceMax(value);
  }

  function niceMax(value) {
    if (value <= 0) return 1;
    var exp = Math.pow(10, Math.floor(Math.log10(value)));
    var steps = [1, 2, 5, 10];
    for (var i = 0; i < steps.length; i++) if (value <= steps[i] * exp) return steps[i] * exp;
    return 10 * exp;
  }

  // An axis label: a duration in its largest sensible unit, never a raw count of minutes.
  function fmtSeconds(value) {
    var units = [[365 * 86400, 'y'], [86400, 'd'], [3600, 'h'], [60, 'm'], [1, 's']];
    for (var i = 0; i < units.length; i++) {
      if (value >= units[i][0]) return (Math.round(value / units[i][0] * 10) / 10) + units[i][1];
    }
    return Math.round(value * 1000) + 'ms';
  }

  // -- repeating tasks: the next occurrences, where they are easy to know ----------------------
  function intervalMs(text) {
    var m = /^PT(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?$/.exec(text || '');
    if (!m || text === 'PT') return NaN;
    return ((+m[1] || 0) * 3600 + (+m[2] || 0) * 60 + (+m[3] || 0)) * 1000;
  }

  function cronMatcher(expr) {
    var fields = String(expr).trim().split(/\s+/);
    if (fields.length !== 5) return null;
    var ranges = [[0, 59], [0, 23], [1, 31], [1, 12], [0, 7]];
    var sets = [];
    for (var i = 0; i < 5; i++) {
      var set = parseCronField(fields[i], ranges[i][0], ranges[i][1]);
      if (!set) return null;
      sets.push(set);
    }
    if (sets[4][7]) sets[4][0] = true;
    var anyDay = fields[2] === '*', anyWeekday = fields[4] === '*';
    return function (d) {
      var dayOk = sets[2][d.getUTCDate()], weekdayOk = sets[4][d.getUTCDay()];
      var day = anyDay || anyWeekday ? dayOk && weekdayOk : dayOk || weekdayOk;
      return sets[0][d.getUTCMinutes()] && sets[1][d.getUTCHours()] && sets[3][d.getUTCMonth() + 1] && day;
    };
  }

  function parseCronField(field, min, max) {
    var set = {};
    var parts = field.split(',');
    for (var i = 0; i < parts.length; i++) {
      var m = /^(\*|(\d+)(?:-(\d+))?)(?:\/(\d+))?$/.exec(parts[i]);
      if (!m) return null;
      var lo = m[1] === '*' ? min : +m[2];
      var hi = m[1] === '*' ? max : (m[3] !== undefined ? +m[3] : (m[4] ? max : lo));
      var step = m[4] ? +m[4] : 1;
      if (lo < min || hi > max || step < 1) return null;
      for (var v = lo; v <= hi; v += step) set[v] = true;
    }
    return set;
  }

  function nextOccurrences(doc, count) {
    var repeat = doc.repeat || {};
    var due = dueOf(doc);
    if (!isFinite(due)) return [];
    var until = repeat.until ? dueOf({date: repeat.until}) : Infinity;
    var out = [due];
    var tz = repeat.timezone;
    if (repeat.interval) {
      var step = intervalMs(repeat.interval);
      if (!(step > 0)) return out;
      while (out.length < count && out[out.length - 1] + step <= until) out.push(out[out.length - 1] + step);
    } else if (repeat.cron && (!tz || tz === 'UTC')) {
      var matches = cronMatcher(repeat.cron);
      if (!matches) return out;
      var t = Math.floor(due / 60000) * 60000 + 60000;
      for (var n = 0; n < 60 * 24 * 8 && out.length < count && t <= until; n++, t += 60000) {
        if (matches(new Date(t))) out.push(t);
      }
    }
    return out;
  }

  // -- actions --------------------------------------------------------------------------------
  var pending = null;

  function openAction(kind, id) {
    var doc = state.tasks[id];
    if (!doc) return;
    pending = {kind: kind, id: id};
    var titles = {cancel: 'Cancel this task?', reschedule: 'Reschedule this task', retry: 'Retry this failed task'};
    var submits = {cancel: 'Cancel task', reschedule: 'Reschedule', retry: 'Retry'};
    $('action-title').textContent = titles[kind];
    $('action-text').textContent = jobName(doc) + (argsText(doc) ? ' ' + argsText(doc) : '') + ' for worker ' +
      doc.worker + ', ' + doc.status + ', due ' + doc.date + '.' +
      (kind === 'cancel' ? ' The worker confirms with "canceled"; a running job finishes first.' : '');
    $('action-date-field').hidden = kind === 'cancel';
    $('action-date').value = kind === 'retry' ? isoNow() : doc.date;
    $('action-error').textContent = '';
    $('action-submit').textContent = submits[kind];
    $('action-submit').className = kind === 'cancel' ? 'danger' : '';
    $('action-submit').disabled = false;
    $('action-dialog').showModal();
    (kind === 'cancel' ? $('action-submit') : $('action-date')).focus();
  }

  function submitAction(event) {
    event.preventDefault();
    if (!pending) return;
    var action = pending;
    var doc = state.tasks[action.id];
    var updated = Object.assign({}, doc);
    if (action.kind === 'cancel') {
      updated.status = 'cancel';
    } else {
      updated.status = 'reschedule';
      updated.date = $('action-date').value.trim();
    }
    $('action-submit').disabled = true;
    http('PUT', docUrl(doc._id), updated).then(function (result) {
      updated._rev = result.rev;
      remember(updated);
      $('action-dialog').close();
      pending = null;
      var said = {cancel: 'cancel requested; the worker confirms with "canceled"',
                  reschedule: 'rescheduled to ' + updated.date, retry: 'set to run again at ' + updated.date};
      notice('Task ' + jobName(doc) + ' (' + doc._id + '): ' + said[action.kind] + '.', 'ok');
      scheduleRefresh(0);
    }, function (error) {
      $('action-submit').disabled = false;
      var text = refusal(error);
      if (error instanceof HttpError && error.status === 409) {
        http('GET', docUrl(doc._id)).then(function (fresh) {
          state.tasks[fresh._id] = fresh;
          $('action-error').textContent = text + ' It is now ' + fresh.status + ': look again, then confirm or close.';
        }, function () { $('action-error').textContent = text; });
        scheduleRefresh(0);
      } else {
        $('action-error').textContent = text;
      }
      notice(text, 'error');
    });
  }

  function showDoc(id) {
    var doc = state.tasks[id];
    var fill = function (value) {
      $('doc-title').textContent = 'Task ' + id;
      $('doc-json').textContent = JSON.stringify(value, null, 2);
      if (!$('doc-dialog').open) $('doc-dialog').showModal();
    };
    http('GET', docUrl(id)).then(function (fresh) {
      state.tasks[id] = fresh;
      fill(fresh);
    }, function (error) {
      if (doc) fill(doc); else notice(refusal(error), 'error');
    });
  }

  function createTask(event) {
    event.preventDefault();
    var message = $('new-task-message');
    message.textContent = '';
    message.className = 'form-message';
    var args;
    try {
      args = JSON.parse($('new-args').value.trim() || '[]');
    } catch (e) {
      message.textContent = 'Arguments: not valid JSON (' + e.message + ').';
      message.className = 'form-message error';
      $('new-args').focus();
      return;
    }
    var task = {
      worker: $('new-worker').value.trim(),
      date: $('new-date').value.trim(),
      job: {name: $('new-job').value.trim(), arguments: args},
      status: 'waiting'
    };
    var kind = $('new-repeat-kind').value;
    if (kind) {
      task.repeat = {};
      task.repeat[kind] = $('new-repeat').value.trim();
    }
    var button = event.target.querySelector('button[type="submit"]');
    button.disabled = true;
    http('POST', DB, task).then(function (result) {
      message.textContent = 'Created task ' + result.id + ' (' + task.job.name + ' for ' + task.worker + ').';
      message.className = 'form-message ok';
      state.workers[task.worker] = true;
      state.jobs[task.job.name] = true;
    }, function (error) {
      message.textContent = refusal(error);
      message.className = 'form-message error';
    }).finally(function () { button.disabled = false; });
  }

  function bindForms() {
    $('login-form').addEventListener('submit', login);
    $('logout').addEventListener('click', logout);
    $('action-form').addEventListener('submit', submitAction);
    $('action-close').addEventListener('click', function () { pending = null; $('action-dialog').close(); });
    $('doc-close').addEventListener('click', function () { $('doc-dialog').close(); });
    $('new-task').addEventListener('submit', createTask);
    $('new-date').value = isoNow(60000);
    $('new-date-now').addEventListener('click', function () { $('new-date').value = isoNow(); });
    $('new-repeat-kind').addEventListener('change', function () {
      var kind = $('new-repeat-kind').value;
      $('new-repeat').disabled = !kind;
      $('new-repeat').placeholder = kind === 'cron' ? '*/5 * * * *' : 'PT1H';
      if (kind) $('new-repeat').focus();
    });
  }

  // -- the clock -------------------------------------------------------------------------------
  function tick() {
    var now = Date.now();
    var rels = document.querySelectorAll('.rel[data-at]');
    for (var i = 0; i < rels.length; i++) {
      var el = rels[i];
      el.textContent = relText(+el.getAttribute('data-at'), el.getAttribute('data-mode'));
    }
    // An upcoming task whose time has come is late unless a worker takes it: look again.
    if (state.upcoming.length && dueOf(state.upcoming[0]) < now - 1000) scheduleRefresh();
    if (new Date(now).getSeconds() === 0) renderChart();
    var states = document.querySelectorAll('#instances tr[data-instance]');
    for (var j = 0; j < states.length; j++) {
      var id = (state.rules.record_prefix || 'after-worker:') + states[j].getAttribute('data-instance');
      var record = state.instances[id];
      if (record && instanceState(record) !== states[j].getAttribute('data-state')) { renderInstances(); break; }
    }
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
