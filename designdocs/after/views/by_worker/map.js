/*
 * Tasks by [worker, status, due] where due is the date in UTC as
 * YYYY-MM-DDTHH:MM:SS.sssZ, so keys sort by time whatever offset a client wrote.
 */
function map(doc) {
  if ((doc.type !== undefined && doc.type !== 'task') || typeof doc.date !== 'string') return;
  var date = doc.date.replace(' ', 'T').replace(/(\.\d{3})\d+/, '$1');
  if (date.length === 10) date += 'T00:00:00';
  if (!/(Z|[+-]\d\d:\d\d)$/.test(date)) date += 'Z';
  var due = new Date(date);
  if (!isNaN(due.getTime())) emit([doc.worker, doc.status, due.toISOString()], null);
}
