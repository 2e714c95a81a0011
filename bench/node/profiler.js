'use strict';
/*
 * Preloaded into the bench's embedded PouchDB Server with `python -m bench
 * --profile-server` (node --require .../profiler.js ...). SIGUSR2 starts V8's
 * CPU profiler; the next SIGUSR2 stops it and writes the profile to
 * $AFTER_BENCH_PROFILE_DIR/<n>.cpuprofile (written aside, then renamed, so the
 * bench never reads half a file). One profile per scenario, one server.
 */
var fs = require('fs');
var inspector = require('inspector');
var path = require('path');

var folder = process.env.AFTER_BENCH_PROFILE_DIR;
var session = new inspector.Session();
var running = false;
var written = 0;

session.connect();

process.on('SIGUSR2', function () {
  if (!running) {
    running = true;
    session.post('Profiler.enable', function () {
      session.post('Profiler.start');
    });
    return;
  }
  session.post('Profiler.stop', function (error, result) {
    running = false;
    written += 1;
    var target = path.join(folder, written + '.cpuprofile');
    var body = error ? JSON.stringify({error: String(error)}) : JSON.stringify(result.profile);
    fs.writeFileSync(target + '.part', body);
    fs.renameSync(target + '.part', target);
  });
});
