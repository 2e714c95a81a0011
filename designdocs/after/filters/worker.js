/*
 * The changes feed of one worker: ?filter=after/worker&worker=NAME.
 * PouchDB Server parses query values as JSON, so compare as strings.
 */
function worker(doc, req) {
  return (doc.type === undefined || doc.type === 'task') && doc.worker === String(req.query.worker);
}
