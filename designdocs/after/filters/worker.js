/*
 * The changes feed of one worker: ?filter=after/worker&worker=NAME[&instance=ID].
 * It brings that worker's tasks, and the records of its instances (so that each
 * instance learns at once when a peer starts or stops, and they share claims).
 * With `instance`, a task another live instance owns is left out once it is
 * running or has ended: only its owner acts on it then (a peer that dies is
 * taken over through the views, a client's cancel or retry comes through), and
 * with several instances most changes are those. A conflicted task always comes.
 * PouchDB Server parses query values as JSON, so compare as strings.
 */
function worker(doc, req) {
  var name = String(req.query.worker);
  if (doc.type === 'worker') {
    return doc.name === name;
  }
  if (!((doc.type === undefined || doc.type === 'task') && doc.worker === name)) {
    return false;
  }
  if (req.query.instance === undefined || doc._conflicts || !doc.owner) {
    return true;
  }
  var ownersOnly = ['running', 'done', 'err', 'canceled'].indexOf(doc.status) >= 0;
  return !ownersOnly || String(doc.owner) === String(req.query.instance);
}
