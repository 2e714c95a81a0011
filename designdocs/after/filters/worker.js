/*
 * The changes feed of one worker: ?filter=after/worker&worker=NAME.
 * It brings that worker's tasks, and the records of its instances (so that each
 * instance learns at once when a peer starts or stops, and they share claims).
 * PouchDB Server parses query values as JSON, so compare as strings.
 */
function worker(doc, req) {
  var name = String(req.query.worker);
  if (doc.type === 'worker') {
    return doc.name === name;
  }
  return (doc.type === undefined || doc.type === 'task') && doc.worker === name;
}
