/*
 * The runs of tasks, newest last in key order, by worker and by job:
 *   ["worker", <worker>, <finished_at>] and ["job", <job name>, <finished_at>].
 * One row per entry of a repeating task's `history` (the last runs it keeps);
 * a task without a history (a one-off) gives one row for its last run, if it ran.
 * The value stays small: the task id and what a listing shows; the full run is
 * in the task (`after history <id>`). Self-contained (no require): PouchDB
 * Server builds each view on its own.
 */
function map(doc) {
  if ((doc.type !== undefined && doc.type !== 'task') || typeof doc.worker !== 'string' ||
      typeof doc.job !== 'object' || doc.job === null || typeof doc.job.name !== 'string') return;

  function summary(error) {
    if (error === undefined || error === null) return undefined;
    var text = typeof error === 'string' ? error : String(error.message || error.type || '');
    text = text.split('\n')[0];
    return text.length > 120 ? text.slice(0, 117) + '...' : text;
  }

  // A fresh object per row: the view server serialises rows after map() returns.
  function value(run, extra, name) {
    var out = {task: doc._id};
    var fields = ['occurrence', 'status', 'started_at', 'duration_ms', 'instance', 'attempt'];
    for (var i = 0; i < fields.length; i++) {
      if (run[fields[i]] !== undefined && run[fields[i]] !== null) out[fields[i]] = run[fields[i]];
    }
    var error = summary(run.error);
    if (error) out.error = error;
    out[extra] = name;
    return out;
  }

  function emitRun(run) {
    if (typeof run.finished_at !== 'string') return;
    emit(['worker', doc.worker, run.finished_at], value(run, 'job', doc.job.name));
    emit(['job', doc.job.name, run.finished_at], value(run, 'worker', doc.worker));
  }

  if (Array.isArray(doc.history)) {
    for (var i = 0; i < doc.history.length; i++) {
      if (doc.history[i] && typeof doc.history[i] === 'object') emitRun(doc.history[i]);
    }
  } else if (!doc.repeat && typeof doc.finished_at === 'string') {
    emitRun({
      occurrence: doc.occurrence || doc.date, finished_at: doc.finished_at, started_at: doc.started_at,
      duration_ms: doc.duration_ms, attempt: doc.attempt, error: doc.error,
      // The task's outcome; a failed attempt waiting for its retry counts as err.
      status: doc.error ? 'err' : (doc.status === 'canceled' ? 'canceled' : 'done'),
      instance: doc.owner
    });
  }
}
