'use strict';
/*
 * After's guard for the embedded PouchDB Server 4.2.0, loaded with
 * `node -r .../guard.js .../pouchdb-server ...` (see after/embedded.py).
 *
 * Started plainly, PouchDB Server dies, wedges or leaks on ordinary requests
 * (couchdb-compat.md, "PouchDB Server hazards"). This preload patches the
 * express-pouchdb code paths behind those hazards while the modules load,
 * before the server builds its app:
 *
 *   - express-pouchdb/lib/create-or-delete-dbs.js: its global promise chain
 *     stayed rejected after a refused `DELETE /db`, so every later request
 *     that opens a database hung. Replaced by a chain that never stays
 *     rejected; a refused destroy keeps the open database in the cache.
 *   - express-pouchdb/lib/utils.js setDBOnReq: a failure to open or wrap a
 *     database is answered instead of leaving the request hanging.
 *   - utils.js jsonParser: a body with a lone surrogate escape ("\udc80") is
 *     refused with 400 "invalid UTF-8 JSON", as Apache CouchDB 3 refuses it
 *     (it was stored, and could not be written back to a real CouchDB).
 *   - pouchdb-changeslike-wrapper (used by pouchdb-security and
 *     pouchdb-system-db for changes() and replication): it re-emitted
 *     'error' on an emitter nobody listens to, which threw after the 404 had
 *     been sent (`_changes` with a bad filter, `_replicate` with an
 *     unreachable end). Errors still reach listeners and the promise.
 *   - routes/db.js: `PUT /db` by a non-admin called `db.info` on a rejected
 *     promise (TypeError, process exit); it is refused with 401 first.
 *   - pouchdb-validation (speed, not safety): for each document written it
 *     read every design document and compiled their validate_doc_update
 *     functions again, most of the cost of a write. Now the documents of one
 *     request share one reading of the design documents' ids and revisions,
 *     and the compiled functions are kept while those stay the same, as
 *     Apache CouchDB keeps them per design-document revision.
 *   - continuous changes feeds (speed, not safety), each of which runs a
 *     one-off scan after every write: pouchdb-utils moves a filtered feed past
 *     the changes its filter left out (it read them all again at every
 *     write); pouchdb-adapter-leveldb-core lets the feeds of a database share
 *     each document's metadata read (N feeds made N reads of it) until the
 *     next write, never while a write is under way; routes/changes.js writes the changes of one turn of the
 *     event loop together (one chunk and system call each, before). With
 *     four workers following a database, its feeds cost about half as much.
 *   - pouchdb-adapter-utils updateDoc: a write refused with 409 left its
 *     revision in the stored tree when the same request wrote that document
 *     again (a leaf with no body: an unresolvable conflict, and a TypeError,
 *     process exit, in every changes feed once it won). It now merges into a
 *     copy of the tree.
 *   - routes/changes.js: a continuous feed is stopped when its client goes
 *     (it went on reading every change of its database, for nobody, with its
 *     heartbeat timer, until the server stopped: each closed feed made every
 *     later write dearer). Filters PouchDB Server cannot serve (`_selector`,
 *     `_design`, `_view` without a view, names without `ddoc/`) are refused
 *     with 400 before they reach PouchDB.
 *   - routes/authorization.js and routes/root.js: `/_node/...` is refused
 *     (404) unless the request is from a logged-in server admin, before and
 *     after every URL rewrite (cluster-rewrite strips `/_node/node1@127.0.0.1`
 *     after authorisation ran, which made `/_config` public); admin-only
 *     paths (`/_config`, `/_log`, ...) are checked again after the rewrites;
 *     `GET /_log` with a `bytes`/`offset` that is not a non-negative integer
 *     (it threw inside fs.createReadStream: process exit) is refused with 400.
 *
 * Every request gets an answer (tests/test_embedded_surface.py sends each route
 * malformed, oversized and wrongly typed bodies and parameters):
 *
 *   - routes/documents.js: multiparty emits no 'close' after an 'error', and the
 *     multipart routes answered only on 'close': a malformed multipart POST to
 *     `/db/<anything>` (also `_purge`, `_missing_revs`, which PouchDB Server
 *     does not have) or multipart/related PUT was never answered; a related
 *     part that is not JSON threw (process exit). Both are answered 400.
 *   - pouchdb-adapter-leveldb-core destroy: it closed the LevelDB store with
 *     reads and writes still queued on it, whose callbacks then never came: a
 *     request racing `DELETE /db` (or, logging in, `DELETE /_users`) hung. The
 *     store now closes after the queued operations; later ones fail with 404.
 *   - bodies PouchDB threw on: `_bulk_docs`/`_bulk_get` `docs` that is not an
 *     array of objects (500 HTML page), `_revs_diff` revisions that are not a
 *     list (TypeError in a callback: process exit), `_replicate` without a
 *     source or target (500 HTML page) are refused with 400; any other
 *     exception a route throws is answered in JSON instead of Express's page.
 *   - bodies that kept the event loop for seconds or exhausted the heap
 *     (PouchDB copies what it is given, for `_all_docs` with keys once per
 *     key): more than 10000 documents in a bulk request (413, CouchDB's
 *     limits), JSON deeper than 1000 levels (400: out of stack) or of more
 *     than 500000 values (413); members of `_all_docs`, view, `_find` and
 *     `_index` bodies that CouchDB does not read are dropped.
 *   - continuous and longpoll feeds: sent uncompressed (gzip held heartbeats
 *     back) and a continuous feed sends its headers at once, its errors being
 *     answered before it starts; heartbeats of 0, negative or over 2^31-1 ms
 *     (a newline every millisecond) are refused.
 *
 * It refuses to start (exit 78) unless pouchdb-server and express-pouchdb are
 * the pinned version and the patched files are byte for byte the ones these
 * patches were written against. Fatal errors end the process with one log
 * line and exit code 70 (uncaught exception) or 71 (cannot listen), so a
 * supervisor can restart it.
 */

var crypto = require('crypto');
var fs = require('fs');
var http = require('http');
var path = require('path');

var PINNED_VERSION = '4.2.0';
var EXIT_FATAL = 70; // EX_SOFTWARE: an uncaught exception
var EXIT_LISTEN = 71; // the server could not listen (port in use, ...)
var EXIT_REFUSED = 78; // EX_CONFIG: not the pinned, unmodified PouchDB Server
var TAG = 'after-embedded-guard:';
var SHARED_METADATA = 10000; // documents whose metadata the changes feeds share at most
// Apache CouchDB's defaults of max_bulk_docs_count and max_bulk_get_count: one
// request of a million documents kept the event loop, and every other request, for minutes.
var MAX_BULK_COUNT = 10000;
// JSON bodies nested deeper are refused: PouchDB walks documents recursively and
// ran out of stack (RangeError) on deeper ones.
var MAX_JSON_DEPTH = 1000;
// JSON bodies of more values are refused (413): PouchDB copies the options and
// documents it is given, several times (about 1.3 us a value each), and a body of
// a million small objects kept the event loop for seconds, or exhausted the heap.
var MAX_JSON_VALUES = 500000;

// The files patched or relied on, as published in the pinned npm packages.
var EXPECTED_SHA256 = {
  'pouchdb-server/lib/index.js':
    '52eeaf0bfa5a6caf51295bce66c37ddb080f9d073dbe0d85883d55784ed4dae7',
  'express-pouchdb/lib/index.js':
    '278552def86bac8a38d5190e11766a7698384805a9f91fa312901c6f83c810dc',
  'express-pouchdb/lib/create-or-delete-dbs.js':
    'c9cb9afdd866e9c5406caf78bb599492f28d40ec2ff9eb7af73b6d05062609c1',
  'express-pouchdb/lib/utils.js':
    '39bbd10491e9b3976d9d7dd7461e612958676e6fd32028752f9c708da1551a01',
  'express-pouchdb/lib/routes/db.js':
    '682524383731b7753209b8ee6c4818f21ccef3d7013cfd14a64438b359a716ea',
  'express-pouchdb/lib/routes/changes.js':
    '4b19e57d13fcd64f32061a77373eb76d6faba3da1770484713e9106d7a7d3939',
  'express-pouchdb/lib/routes/authorization.js':
    'b6dc1535caa22537a05b0292ae993de730fff106ebac9c25c94a8af5ba948e97',
  'express-pouchdb/lib/routes/cluster-rewrite.js':
    'd25d5284826f9facd477ac5da8fe587a055a7cfde072b0a06ae93463b6325d8e',
  'express-pouchdb/lib/routes/log.js':
    'd3d414018699cb130ec690311579723c770f47d0d1594bc4953a26c9b81f2b5d',
  'express-pouchdb/lib/logging-infrastructure.js':
    '9fdc59fb97bce4f665aacf9ff094349658064cc0a4700ac8ab0cd0650f3b28c8',
  'express-pouchdb/lib/routes/root.js':
    '3df30184fbce4ebadc12291ff7038b58eaea998c3e7c4d0b8e7528262ffbac76',
  'express-pouchdb/lib/routes/documents.js':
    '3ec3d08ca22aaf4f2528809e65195d7dbe614d6681345abcd0ec68acd6621f73',
  'express-pouchdb/lib/routes/bulk-docs.js':
    '2896694cd017df2e4e9004d212da85edb152721a78fefc50786235cc0996b541',
  'express-pouchdb/lib/routes/bulk-get.js':
    'b8dd9a3ee9bd3f2d5d786e22e204e4982262802571c05acea85e8c6468581322',
  'express-pouchdb/lib/routes/revs-diff.js':
    '2c122166198369e40a4f0e76301ecdcd8107b3a978af3d6dbe77c853c41970c4',
  'express-pouchdb/lib/routes/replicate.js':
    'd7407235208132dbae074fd3ccb3076f541a3e746d1b591e7ac16cf614f5188d',
  'express-pouchdb/lib/routes/all-docs.js':
    '8a84ce58c8ce3f3aca2f3c20a6a1c3e96e92e33a475460b4ec9e9f90dc0c4772',
  'express-pouchdb/lib/routes/views.js':
    'b29bca5a9188c3e83c0262a941f7f68c36f34b0fe005267fcbc4b34ac7756813',
  'express-pouchdb/lib/routes/temp-views.js':
    '31a62783b60e6e5e8af62880babd21a95136bf12417b07ecbdf2d214e4de95e7',
  'pouchdb-changeslike-wrapper/lib/index.js':
    'a3788f67004fb6e4fdfc8735a31bbc885c95a0e3709caaaaa1b16e917bfe5333',
  'pouchdb-security/lib/index.js':
    '5c976f9a5a42aa429c5a7594160d16c5f32ed5290cdf9e8f4f38258699199457',
  'pouchdb-validation/lib/index.js':
    '568f321f8302df1a18fe30d9d5eaf8e300e23b8b6810adb06a673afb53877ed3',
  'pouchdb-adapter-leveldb-core/lib/index.js':
    'a1b65bdd715de36ac02b63f7c146826fbd7710d4543f1ebb694585a3491b028a',
  'pouchdb-utils/lib/index.js':
    '3a936aceadfcf42d45b0311990de62f49d9bda97dd478faa10b2a70efc743315',
  'pouchdb-adapter-utils/lib/index.js':
    '7b01deb869807f14bca68e2a34105b9cc5186fc0ad24d484af420a40f8d42887'
};

// Paths only a server admin may use (routes/authorization.js), checked again
// after vhosts, cluster-rewrite and design-document rewrites changed the URL.
var ADMIN_ONLY = /^\/(?:_config|_log|_active_tasks|_db_updates|_restart)(?:\/|$)/;
var NODE_PREFIX = /^\/_node(?:\/|$)/;

function log(message) {
  process.stderr.write(TAG + ' ' + message + '\n');
}

function refuse(message) {
  log('refusing to start: ' + message);
  process.exit(EXIT_REFUSED);
}

// --- fatal errors: one clear line, a clear exit code ----------------------

process.on('uncaughtException', function (err) {
  var detail = (err && err.stack) || String(err);
  log('fatal: uncaught exception, exiting with code ' + EXIT_FATAL + ': ' + detail);
  process.exit(EXIT_FATAL);
});

process.on('SIGTERM', function () {
  log('stopping on SIGTERM');
  process.exit(0);
});

// pouchdb-server only logs a listen error (and then crashes on an undefined
// stopTailingLog). Say what happened and exit with a code of our own.
var originalListen = http.Server.prototype.listen;
http.Server.prototype.listen = function () {
  this.once('error', function (err) {
    if (err && err.syscall === 'listen') {
      log('fatal: cannot listen (' + err.code + '): ' + err.message +
          ', exiting with code ' + EXIT_LISTEN);
      process.exit(EXIT_LISTEN);
    }
  });
  this.once('listening', checkAllPatchesApplied);
  return originalListen.apply(this, arguments);
};

// --- version check ---------------------------------------------------------

var serverScript;
try {
  serverScript = fs.realpathSync(process.argv[1] || '');
} catch (err) {
  refuse('cannot find the pouchdb-server script (' + process.argv[1] + ')');
}
var serverDir = path.resolve(path.dirname(serverScript), '..');

function readJSON(file) {
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (err) {
    return null;
  }
}

var serverPkg = readJSON(path.join(serverDir, 'package.json'));
if (!serverPkg || serverPkg.name !== 'pouchdb-server') {
  refuse(serverScript + ' is not the pouchdb-server npm package; ' +
         'run `npm ci` in the After checkout');
}
if (serverPkg.version !== PINNED_VERSION) {
  refuse('pouchdb-server ' + serverPkg.version + ' is installed, After needs ' +
         PINNED_VERSION + ' exactly (its safety patches are written for it); ' +
         'run `npm ci` in the After checkout');
}

function resolveFrom(baseDir, request) {
  try {
    return require.resolve(request, {paths: [baseDir]});
  } catch (err) {
    refuse('cannot find ' + request + ' from ' + baseDir + '; run `npm ci`');
  }
}

var expressDir = path.dirname(resolveFrom(serverDir, 'express-pouchdb/package.json'));
var expressPkg = readJSON(path.join(expressDir, 'package.json'));
if (!expressPkg || expressPkg.version !== PINNED_VERSION) {
  refuse('express-pouchdb ' + (expressPkg && expressPkg.version) +
         ' is installed, After needs ' + PINNED_VERSION + ' exactly; run `npm ci`');
}
var securityDir = path.dirname(resolveFrom(expressDir, 'pouchdb-security/package.json'));
var changeslikeDir = path.dirname(
  resolveFrom(securityDir, 'pouchdb-changeslike-wrapper/package.json'));

var validationDir = path.dirname(resolveFrom(expressDir, 'pouchdb-validation/package.json'));
// The LevelDB adapter the server's databases use, and the utilities it runs changes with.
var levelDir = path.dirname(resolveFrom(serverDir, 'pouchdb-adapter-leveldb/package.json'));
var levelCoreDir = path.dirname(resolveFrom(levelDir, 'pouchdb-adapter-leveldb-core/package.json'));
var utilsDir = path.dirname(resolveFrom(levelCoreDir, 'pouchdb-utils/package.json'));
var adapterUtilsDir = path.dirname(resolveFrom(levelCoreDir, 'pouchdb-adapter-utils/package.json'));

var packageDirs = {
  'pouchdb-server': serverDir,
  'express-pouchdb': expressDir,
  'pouchdb-security': securityDir,
  'pouchdb-changeslike-wrapper': changeslikeDir,
  'pouchdb-validation': validationDir,
  'pouchdb-adapter-leveldb-core': levelCoreDir,
  'pouchdb-utils': utilsDir,
  'pouchdb-adapter-utils': adapterUtilsDir
};

function fileOf(relative) {
  var slash = relative.indexOf('/');
  return path.join(packageDirs[relative.slice(0, slash)], relative.slice(slash + 1));
}

Object.keys(EXPECTED_SHA256).forEach(function (relative) {
  var file = fileOf(relative);
  var digest;
  try {
    digest = crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');
  } catch (err) {
    refuse('cannot read ' + file + ': ' + err.message);
  }
  if (digest !== EXPECTED_SHA256[relative]) {
    refuse(file + ' differs from the published ' + relative.split('/')[0] + ' ' +
           PINNED_VERSION + ' (sha256 ' + digest + '); reinstall with `npm ci`');
  }
});

// --- patching helpers --------------------------------------------------------

var applied = {};

// Load a module now and swap what later require() calls of it return.
function replaceExports(relative, makeExports) {
  var file = require.resolve(fileOf(relative));
  var original = require(file);
  require.cache[file].exports = makeExports(original);
}

// Load a module from its source with passages replaced: pairs [passage,
// replacement] (the file's digest was checked above, so each passage is there
// exactly once).
function replaceInSource(relative, replacements) {
  var Module = require('module');
  var file = require.resolve(fileOf(relative));
  var source = fs.readFileSync(file, 'utf8');
  replacements.forEach(function (pair) {
    if (source.split(pair[0]).length !== 2) {
      refuse('cannot patch ' + file + ': the passage to replace is not there once');
    }
    source = source.replace(pair[0], function () { return pair[1]; });
  });
  var patched = new Module(file, module);
  patched.filename = file;
  patched.paths = Module._nodeModulePaths(path.dirname(file));
  patched._compile(source, file);
  patched.loaded = true;
  require.cache[file] = patched;
}

// Wrap a route module of express-pouchdb: `before(app)` runs just before the
// module registers its own routes and middleware.
function beforeRoutes(name, before) {
  replaceExports('express-pouchdb/lib/routes/' + name + '.js', function (original) {
    return function (app) {
      before(app);
      applied['routes/' + name] = true;
      return original.apply(this, arguments);
    };
  });
}

function checkAllPatchesApplied() {
  var missing = [
    'create-or-delete-dbs', 'utils.setDBOnReq', 'utils.jsonParser', 'pouchdb-changeslike-wrapper',
    'pouchdb-validation', 'pouchdb-utils', 'pouchdb-adapter-leveldb-core', 'pouchdb-adapter-utils',
    'routes/changes batching',
    'routes/authorization', 'routes/root', 'routes/db', 'routes/changes', 'routes/find',
    'routes/bulk-get', 'routes/bulk-docs', 'routes/revs-diff', 'routes/replicate',
    'routes/documents multipart', 'routes/404', 'routes/all-docs', 'routes/views',
    'routes/temp-views'
  ].filter(function (name) {
    return !applied[name];
  });
  if (missing.length) {
    refuse('the safety patches were not all applied (' + missing.join(', ') +
           '); is pouchdb-server using another copy of express-pouchdb?');
  }
  log('PouchDB Server ' + PINNED_VERSION + ' guarded (pid ' + process.pid + ')');
}

function sendError(res, status, error, reason) {
  if (res.headersSent) {
    return res.end();
  }
  utils.sendJSON(res, status, {error: error, reason: reason});
}

function userCtx(req) {
  return (req.couchSession && req.couchSession.userCtx) || {name: null, roles: []};
}

function isServerAdmin(req) {
  return (userCtx(req).roles || []).indexOf('_admin') !== -1;
}

function isLoggedInServerAdmin(req) {
  return isServerAdmin(req) && typeof userCtx(req).name === 'string';
}

// --- create-or-delete-dbs.js: a lock chain that never stays rejected -------

replaceExports('express-pouchdb/lib/create-or-delete-dbs.js', function (original) {
  var chain = Promise.resolve();
  function noop() {}

  function doSequentially(fun) {
    var result = chain.then(fun);
    chain = result.then(noop, noop);
    return result;
  }

  function cacheOf(PouchDB) {
    if (!PouchDB.__dbCacheMap) {
      PouchDB.__dbCacheMap = new Map();
    }
    return PouchDB.__dbCacheMap;
  }

  function getOrCreateDB(PouchDB, dbName) {
    return doSequentially(function () {
      var cache = cacheOf(PouchDB);
      var db = cache.get(dbName);
      if (!db) {
        db = new PouchDB(dbName);
        cache.set(dbName, db);
      }
      return db;
    });
  }

  function deleteDB(PouchDB, dbName, opts) {
    return doSequentially(function () {
      var cache = cacheOf(PouchDB);
      var db = cache.get(dbName);
      if (!db) {
        return PouchDB.destroy(dbName, opts);
      }
      cache.delete(dbName);
      return db.destroy(opts).catch(function (err) {
        // refused (not a server admin): the database is still open and in use
        if (err && (err.status === 401 || err.status === 403) && !cache.has(dbName)) {
          cache.set(dbName, db);
        }
        throw err;
      });
    });
  }

  applied['create-or-delete-dbs'] = true;
  var patched = Object.assign({}, original);
  patched.getOrCreateDB = getOrCreateDB;
  patched.deleteDB = deleteDB;
  return patched;
});

// utils.js is loaded only now, so that it already sees the patched module.
var utils = require(fileOf('express-pouchdb/lib/utils.js'));

// --- utils.setDBOnReq: answer instead of hanging -----------------------------

(function () {
  var cleanFilename = require(fileOf('express-pouchdb/lib/clean-filename.js'));
  var getOrCreateDB = require(fileOf('express-pouchdb/lib/create-or-delete-dbs.js')).getOrCreateDB;
  var mkdirp = require(resolveFrom(expressDir, 'mkdirp'));

  utils.setDBOnReq = function (dbName, dbWrapper, req, res, next) {
    dbName = cleanFilename(dbName);
    req.PouchDB.allDbs(function (err, dbs) {
      if (err) {
        return utils.sendError(res, err);
      }
      if (dbs.indexOf(dbName) === -1) {
        return utils.sendJSON(res, 404, {error: 'not_found', reason: 'no_db_file'});
      }
      getOrCreateDB(req.PouchDB, dbName).then(function (db) {
        // the workaround of the original for pouchdb/pouchdb#5668
        if (/\//.test(dbName)) {
          var dbPath = db.__opts.prefix ? db.__opts.prefix + dbName : dbName;
          mkdirp.sync(path.resolve(dbPath));
        }
        return dbWrapper.wrap(dbName, db).then(function () {
          req.db = db;
        });
      }).then(function () {
        next();
      }, function (err) {
        log('cannot open database ' + JSON.stringify(dbName) + ': ' + ((err && err.stack) || err));
        sendError(res, (err && err.status) || 500, (err && err.name) || 'unknown_error',
                  (err && err.message) || 'cannot open the database');
      });
    });
  };
  applied['utils.setDBOnReq'] = true;
})();

// --- utils.jsonParser: refuse what Apache CouchDB refuses ---------------------
//
// A lone surrogate escape ("\udc80") is valid JSON syntax but not Unicode:
// Apache CouchDB 3 refuses such a request as a whole (400 "invalid UTF-8 JSON")
// and PouchDB Server stored it, so a document written here could not be written
// back to, or replicated into, a real CouchDB. The raw body is searched for a
// surrogate escape first (native, per request); only a body that has one is
// walked after parsing. Otherwise the parser of the original (utils.js
// buildJSONParser(false)), with the same answers.

(function () {
  var bodyParser = require(resolveFrom(expressDir, 'body-parser'));
  var SURROGATE_ESCAPE = /\\u[dD][89a-fA-F][0-9a-fA-F]{2}/;
  var LONE = /[\ud800-\udbff](?![\udc00-\udfff])|(?:[^\ud800-\udbff]|^)[\udc00-\udfff]/;

  function hasLoneSurrogate(value) {
    if (typeof value === 'string') {
      return LONE.test(value);
    }
    if (typeof value !== 'object' || value === null) {
      return false;
    }
    for (var key in value) {
      if (Object.prototype.hasOwnProperty.call(value, key) &&
          (LONE.test(key) || hasLoneSurrogate(value[key]))) {
        return true;
      }
    }
    return false;
  }

  // A body nested deeper than MAX_JSON_DEPTH or made of more than MAX_JSON_VALUES
  // values is refused before it is parsed: one pass over the bytes, only for bodies
  // long enough to be either.
  function bodyProblem(buf) {
    if (buf.length <= 2 * MAX_JSON_DEPTH) {
      return null;
    }
    var depth = 0;
    var values = 0;
    var inString = false;
    for (var i = 0; i < buf.length; i++) {
      var c = buf[i];
      if (inString) {
        if (c === 0x5c) { // backslash: skip the escaped byte
          i++;
        } else if (c === 0x22) {
          inString = false;
        }
      } else if (c === 0x22) {
        inString = true;
      } else if (c === 0x7b || c === 0x5b) { // { [
        values++;
        if (++depth > MAX_JSON_DEPTH) {
          return {status: 400, error: 'bad_request',
                  reason: 'JSON nested deeper than ' + MAX_JSON_DEPTH + ' levels'};
        }
      } else if (c === 0x7d || c === 0x5d) {
        depth--;
      } else if (c === 0x2c && ++values > MAX_JSON_VALUES) { // ,
        return {status: 413, error: 'too_large',
                reason: 'the request has more than ' + MAX_JSON_VALUES + ' JSON values'};
      }
    }
    return null;
  }

  function verify(req, res, buf) {
    var problem = bodyProblem(buf);
    if (problem) {
      var err = new Error(problem.reason);
      err.status = problem.status; // body-parser answers with it, without parsing
      err.afterProblem = problem;
      throw err;
    }
    req.afterSurrogateEscape = buf.indexOf('\\u') >= 0 && SURROGATE_ESCAPE.test(buf.toString('latin1'));
  }

  utils.jsonParser = function (req, res, next) {
    var limit = req.app.couchConfig ?
      req.app.couchConfig.get('couchdb', 'max_document_size') : utils.maxDocumentSizeDefault;
    bodyParser.json({limit: limit, verify: verify})(req, res, function (err) {
      if (err) {
        if (err.afterProblem) {
          var problem = err.afterProblem;
          return utils.sendJSON(res, problem.status, {error: problem.error, reason: problem.reason});
        }
        if (err.status === 400) {
          return utils.sendJSON(res, 400, {error: 'bad_request', reason: 'invalid_json'});
        }
        if (err.status === 413) {
          return utils.sendJSON(res, 413, {error: 'too_large', reason: 'the request entity is too large'});
        }
        return utils.sendError(res, err, 500);
      }
      if (req.afterSurrogateEscape && hasLoneSurrogate(req.body)) {
        return utils.sendJSON(res, 400, {error: 'bad_request', reason: 'invalid UTF-8 JSON'});
      }
      next();
    });
  };
  applied['utils.jsonParser'] = true;
})();

// --- pouchdb-changeslike-wrapper: no 'error' event nobody listens to --------

replaceExports('pouchdb-changeslike-wrapper/lib/index.js', function () {
  var EventEmitter = require('events').EventEmitter;
  var forwarded = ['change', 'complete', 'create', 'update', 'delete'];

  function changesLikeWrapper(handler, origChanges, args) {
    var newResult = new EventEmitter();
    var isCancelled = false;

    var promise = handler(function () {
      var origResult = origChanges();
      forwarded.forEach(function (event) {
        origResult.on(event, newResult.emit.bind(newResult, event));
      });
      // The error also rejects the promise; only re-emit it when someone
      // listens, else EventEmitter throws it and the process dies.
      origResult.on('error', function (err) {
        if (newResult.listenerCount('error') > 0) {
          newResult.emit('error', err);
        }
      });
      if (isCancelled) {
        origResult.cancel();
      } else {
        newResult.on('cancel', function () {
          origResult.cancel();
        });
      }
      return origResult;
    }, args);

    newResult.then = promise.then.bind(promise);
    newResult.catch = promise.catch.bind(promise);
    // Callers that only listen to events must not leave a rejection unhandled.
    promise.then(null, function () {});
    newResult.cancel = function () {
      isCancelled = true;
      newResult.emit('cancel');
      newResult.removeAllListeners();
    };
    return newResult;
  }

  applied['pouchdb-changeslike-wrapper'] = true;
  return function createChangeslikeWrapper(handler) {
    return changesLikeWrapper.bind(null, handler);
  };
});

// --- pouchdb-validation: compile the validate functions once per design-doc revision ---

replaceInSource('pouchdb-validation/lib/index.js', [[[
  'function getValidationFunctions(db) {',
  '  return db.allDocs({',
  '    startkey: "_design/",',
  '    endkey: "_design0",',
  '    include_docs: true',
  '  }).then(parseValidationFunctions);',
  '}'
].join('\n'), [
  'function getValidationFunctions(db) {',
  '  // The documents of one _bulk_docs request are validated in one synchronous loop:',
  '  // they share one read of the design documents (a later request reads them again).',
  '  if (db.__afterDesignDocsRead) {',
  '    return db.__afterDesignDocsRead;',
  '  }',
  '  var range = {startkey: "_design/", endkey: "_design0"};',
  '  var read = db.__afterDesignDocsRead = db.allDocs(range).then(function (resp) {',
  '    var key = resp.rows.map(function (row) {',
  '      return row.id + "@" + row.value.rev;',
  '    }).join("\\n");',
  '    var cached = db.__afterValidationFunctions;',
  '    if (cached && cached.key === key) {',
  '      return cached.functions;',
  '    }',
  '    range.include_docs = true;',
  '    return db.allDocs(range).then(parseValidationFunctions).then(function (functions) {',
  '      db.__afterValidationFunctions = {key: key, functions: functions};',
  '      return functions;',
  '    });',
  '  });',
  '  process.nextTick(function () {',
  '    db.__afterDesignDocsRead = null;',
  '  });',
  '  return read;',
  '}'
].join('\n')]]);
applied['pouchdb-validation'] = true;

// --- pouchdb-adapter-utils: a refused write must not change the revision tree --------

// updateDoc merged the new revision into the stored tree in place (pouchdb-merge's
// merge mutates its input) before checking for a conflict. A refused write (409)
// thus left its revision in the tree the same request's next write of that
// document started from: e.g. `_bulk_docs` [an update of a revision that is no
// longer a leaf, the deletion of a conflict's loser]. The tree was then stored
// with a leaf that has no body: a conflict nobody can resolve, GET ?rev= 404,
// and, once that leaf won, a TypeError in every changes feed (process exit).
replaceInSource('pouchdb-adapter-utils/lib/index.js', [[[
  '  var merged = pouchdbMerge.merge(prev.rev_tree, docInfo.metadata.rev_tree[0], revLimit);'
].join('\n'), [
  '  // After\'s guard: merge into a copy, so that a refused write leaves prev as it was.',
  '  var merged = pouchdbMerge.merge(JSON.parse(JSON.stringify(prev.rev_tree)),',
  '    docInfo.metadata.rev_tree[0], revLimit);'
].join('\n')]]);
applied['pouchdb-adapter-utils'] = true;

// --- continuous changes feeds: less work for each feed (speed, not safety) ---------

// A continuous feed runs a one-off changes() from its last sequence after every
// write. That sequence only moved on changes the filter let through, so each run
// read again everything the filter had left out since; now it moves past what
// was read, as CouchDB's feeds do.
replaceInSource('pouchdb-utils/lib/index.js', [[[
  "    }).on('complete', function () {",
  "      if (inprogress === 'waiting') {"
].join('\n'), [
  "    }).on('complete', function (resp) {",
  "      var read = resp && resp.last_seq;",
  "      if (typeof read === 'number' && typeof opts.since === 'number' &&",
  "          read > opts.since && !opts.cancelled) {",
  "        opts.since = read; // After's guard: past the changes left out too",
  "      }",
  "      if (inprogress === 'waiting') {"
].join('\n')]]);
applied['pouchdb-utils'] = true;

// Each feed read each changed document's metadata (revision tree, winning
// sequence) for itself: N feeds, N reads of the same key. The feeds of a
// database now share the reads: one read at a time per document, kept until the
// next write starts or ends (every write under the adapter's lock clears them),
// and at most SHARED_METADATA documents.
replaceInSource('pouchdb-adapter-leveldb-core/lib/index.js', [[[
  '      // metadata not cached, have to go fetch it',
  '      stores.docStore.get(doc._id, function (err, metadata) {'
].join('\n'), [
  '      // metadata not cached: read it, or share a read of it (After\'s guard)',
  '      sharedMetadata(doc._id, function (err, metadata) {'
].join('\n')], [[
  '  function runWriteOperation(firstTask) {',
  '    var args = firstTask.args;',
  '    var callback = args[args.length - 1];',
  '    args[args.length - 1] = getArguments(function (cbArgs) {',
  '      callback.apply(null, cbArgs);'
].join('\n'), [
  '  // After\'s guard: document metadata read by the changes feeds, shared by them.',
  '  function sharedState() {',
  '    return db.__afterMetadata ||',
  '      (db.__afterMetadata = {writes: 0, writing: false, docs: new Map()});',
  '  }',
  '  function sharedMetadata(id, callback) {',
  '    var shared = sharedState();',
  '    if (shared.writing) {',
  '      // a write is under way: a read begun now may predate its batch, and a feed that',
  '      // joined it for a change that batch made would drop that change as superseded',
  '      return stores.docStore.get(id, callback);',
  '    }',
  '    var entry = shared.docs.get(id);',
  '    if (entry && entry.metadata) {',
  '      return callback(null, entry.metadata);',
  '    }',
  '    if (entry) {',
  '      return entry.waiting.push(callback);',
  '    }',
  '    if (shared.docs.size >= ' + SHARED_METADATA + ') {',
  '      shared.docs.clear();',
  '    }',
  '    entry = {metadata: null, waiting: [callback]};',
  '    shared.docs.set(id, entry);',
  '    var writes = shared.writes;',
  '    stores.docStore.get(id, function (err, metadata) {',
  '      if (shared.docs.get(id) === entry) {',
  '        if (err || writes !== shared.writes) {',
  '          shared.docs.delete(id); // a write ran meanwhile: it may have changed it',
  '        } else {',
  '          entry.metadata = metadata;',
  '        }',
  '      }',
  '      entry.waiting.forEach(function (waiting) {',
  '        waiting(err, metadata);',
  '      });',
  '      entry.waiting = null;',
  '    });',
  '  }',
  '  function forgetSharedMetadata(writing) {',
  '    var shared = sharedState();',
  '    shared.writes++;',
  '    shared.writing = writing;',
  '    shared.docs.clear();',
  '  }',
  '',
  '  function runWriteOperation(firstTask) {',
  '    forgetSharedMetadata(true);',
  '    var args = firstTask.args;',
  '    var callback = args[args.length - 1];',
  '    args[args.length - 1] = getArguments(function (cbArgs) {',
  '      forgetSharedMetadata(false);',
  '      callback.apply(null, cbArgs);'
].join('\n')], [
  '    changeStream.pipe(throughStream);',
  [
    '    changeStream.pipe(throughStream);',
    '    // After\'s guard: a change waits for its metadata before the next is looked at,',
    '    // one read per turn of a busy event loop; start the reads of the changes',
    '    // buffered behind it meanwhile (they are shared, so each is read once).',
    '    changeStream.on(\'data\', function (data) {',
    '      if (!opts.cancelled && !opts.done && data.value && data.value._id) {',
    '        sharedMetadata(data.value._id, function () {});',
    '      }',
    '    });'
  ].join('\n')
], [[
  '  function executeNext() {',
  '    var firstTask = db._queue.peekFront();',
  ''
].join('\n'), [
  '  function executeNext() {',
  '    var firstTask = db._queue.peekFront();',
  '    if (db.__afterClosed) { // After\'s guard: see api._destroy',
  '      var gone = pouchdbErrors.createError(pouchdbErrors.MISSING_DOC, \'Database does not exist.\');',
  '      while (db._queue.length) {',
  '        var failed = db._queue.shift().args;',
  '        failed[failed.length - 1](gone);',
  '      }',
  '      return;',
  '    }',
  ''
].join('\n')], [[
  '      dbStore.get(name).close(function () {',
  '        dbStore.delete(name);',
  '        callDestroy(name, callback);',
  '      });'
].join('\n'), [
  '      var store = dbStore.get(name);',
  '      var closeStore = function () {',
  '        store.__afterClosed = true;',
  '        store.close(function () {',
  '          dbStore.delete(name);',
  '          callDestroy(name, callback);',
  '        });',
  '      };',
  '      if (store === db && db._queue) {',
  '        // After\'s guard: close the store once the reads and writes queued on it are',
  '        // done; those queued later fail (executeNext) instead of never answering',
  '        writeLock(function (done) {',
  '          closeStore();',
  '          done();',
  '        })(function () {});',
  '      } else {',
  '        closeStore();',
  '      }'
].join('\n')]]);
applied['pouchdb-adapter-leveldb-core'] = true;

// A continuous feed wrote each change on its own: one chunk and one system call
// per change and feed, and as many reads for the client. The changes of one
// turn of the event loop now go out together. And a continuous feed whose client
// had gone was never stopped (only longpoll feeds were): it went on reading every
// change of its database, for nobody, with its heartbeat timer, until the server
// stopped. Both stop when the response closes.
replaceInSource('express-pouchdb/lib/routes/changes.js', [[[
  "        req.db.changes(req.query).on('change', function (change) {",
  "          written = true;",
  "          utils.writeJSON(res, change);",
  "        }).on('error', function (err) {",
  "          if (!written) {",
  "            utils.sendError(res, err);",
  "          } else {",
  "            res.end();",
  "          }",
  "          cleanup();",
  "        });"
].join('\n'), [
  "        var lines = []; // After's guard: written together, once per turn",
  "        var flush = function () {",
  "          if (lines.length && !res.writableEnded) {",
  "            res.write(Buffer.from(lines.join(''), 'utf8'));",
  "          }",
  "          lines = [];",
  "        };",
  "        var feed = req.db.changes(req.query).on('change', function (change) {",
  "          written = true;",
  "          if (!lines.length) {",
  "            setImmediate(flush);",
  "          }",
  "          lines.push(JSON.stringify(change) + '\\n');",
  "        }).on('error', function (err) {",
  "          if (!written && !res.headersSent) {",
  "            utils.sendError(res, err);",
  "          } else {",
  "            flush();",
  "            res.end();",
  "          }",
  "          cleanup();",
  "        });",
  "        res.on('close', function () { // the client has gone",
  "          feed.cancel();",
  "          cleanup();",
  "        });",
  "        if (req.afterFlushFeed && !res.headersSent) {",
  "          res.flushHeaders(); // its errors were answered before (checkFeed)",
  "        }"
].join('\n')]]);
applied['routes/changes batching'] = true;

// --- /_node and admin-only paths ------------------------------------------------

function decodedPath(req) {
  var pathname = req.url.split('?')[0];
  try {
    return decodeURIComponent(pathname).toLowerCase();
  } catch (err) {
    return pathname.toLowerCase();
  }
}

function guardSpecialPaths(req, res, next) {
  var pathname = decodedPath(req);
  if (NODE_PREFIX.test(pathname) && !isLoggedInServerAdmin(req)) {
    return sendError(res, 404, 'not_found',
                     'the /_node API is only for logged-in server admins here');
  }
  if (ADMIN_ONLY.test(pathname) && !isServerAdmin(req)) {
    return sendError(res, 401, 'unauthorized', 'You are not a server admin.');
  }
  next();
}

// before authorisation (after authentication) and every URL rewrite ...
beforeRoutes('authorization', function (app) {
  app.use(guardSpecialPaths);
});
// ... and again once vhosts, cluster-rewrite and rewrites are done
beforeRoutes('root', function (app) {
  app.use(guardSpecialPaths);
  app.get('/_log', checkLogParameters);
});

// `GET /_log?bytes=abc` (or a negative or fractional number) reached
// fs.createReadStream as NaN and threw outside any handler: process exit.
function checkLogParameters(req, res, next) {
  var bad = ['bytes', 'offset'].filter(function (name) {
    var value = req.query[name];
    return typeof value !== 'undefined' && !(Number.isSafeInteger(value) && value >= 0);
  });
  if (bad.length) {
    return sendError(res, 400, 'bad_request',
                     '`' + bad[0] + '` must be a non-negative integer');
  }
  next();
}

// --- PUT /db by a non-admin: refuse before routes/db.js crashes --------------

beforeRoutes('db', function (app) {
  app.put('/:db', function (req, res, next) {
    if (!isServerAdmin(req)) {
      return sendError(res, 401, 'unauthorized', 'You are not a server admin.');
    }
    next();
  });
});

// --- _find, _explain, _index, _bulk_get: the database's _security applies -----
//
// pouchdb-find is installed after pouchdb-security has wrapped the database
// methods, and bulkGet reads around the wrapped ones: these routes answered
// anonymous requests with documents when the database's `_security` admits
// members only. Apache CouchDB answers them 401 (anonymous) or 403 like any read.
// The check is pouchdb-security's own: `info()` requires a member, so a request
// that may not read the database gets the error it would get on `GET /db`.

function requireReader(req, res, next) {
  if (!req.db || typeof req.db.info !== 'function') {
    return next();
  }
  req.db.info(utils.makeOpts(req)).then(function () {
    next();
  }, function (err) {
    sendError(res, (err && err.status) || 500, (err && err.name) || 'unknown_error',
              (err && err.message) || 'cannot read the database');
  });
}

beforeRoutes('find', function (app) {
  app.get('/:db/_index', requireReader);
  app.post('/:db/_index', requireReader, utils.jsonParser, keepOnly(INDEX_PARAMS));
  app.delete('/:db/_index/*', requireReader);
  app.post('/:db/_find', requireReader, utils.jsonParser, keepOnly(FIND_PARAMS));
  app.post('/:db/_explain', requireReader, utils.jsonParser, keepOnly(FIND_PARAMS));
});

beforeRoutes('bulk-get', function (app) {
  app.post('/:db/_bulk_get', requireReader);
  app.post('/:db/_bulk_get', utils.jsonParser, bulkCheck('max_bulk_get_count_exceeded'));
});

// --- _changes filters PouchDB Server cannot serve -----------------------------

function checkChangesFilter(req, res, next) {
  var filter = req.query.filter;
  var view = req.query.view;
  if (typeof filter === 'undefined' || filter === '_doc_ids') {
    return next();
  }
  if (typeof filter !== 'string') {
    return sendError(res, 400, 'bad_request',
                     '`filter` must be ddoc/name, _doc_ids or _view');
  }
  if (filter === '_view') {
    if (typeof view !== 'string' || !/^[^/]+\/[^/]+$/.test(view)) {
      return sendError(res, 400, 'bad_request',
                       '`filter=_view` needs a `view` parameter of the form ddoc/view');
    }
    return next();
  }
  if (filter === '_selector' || filter === '_design') {
    return sendError(res, 400, 'bad_request',
                     '`filter=' + filter + '` is not supported by PouchDB Server');
  }
  if (filter.charAt(0) === '_' || !/^[^/]+\/[^/]+$/.test(filter)) {
    return sendError(res, 400, 'bad_request',
                     '`filter` must be ddoc/name, _doc_ids or _view');
  }
  next();
}

// --- feeds that stay open: their headers go out at once --------------------------------
//
// A continuous feed with nothing to send yet (`since=now`) sent no headers until its
// first heartbeat (6 s) or change, and any feed a client asked gzipped for was held
// in the compressor's buffer, heartbeats too. Such feeds are now sent uncompressed,
// as CouchDB sends them, and a continuous feed sends its headers when it starts.
// Errors it would have answered later (a missing design document or filter, a
// reader who is not a member) are answered before. A heartbeat that is not a
// positive number of milliseconds (0 or -1: a newline every millisecond; more than
// 2^31-1: Node makes it 1 ms) is refused.

var MAX_TIMER = 2147483647;

function checkFeed(req, res, next) {
  var feed = req.query.feed;
  if (feed !== 'continuous' && feed !== 'longpoll') {
    return next();
  }
  var heartbeat = req.query.heartbeat;
  if (typeof heartbeat !== 'undefined' && heartbeat !== true &&
      !(typeof heartbeat === 'number' && heartbeat >= 1 && heartbeat <= MAX_TIMER)) {
    return sendError(res, 400, 'bad_request',
                     'Invalid heartbeat value. Expecting a positive integer value.');
  }
  res.setHeader('Cache-Control', 'must-revalidate, no-transform');
  if (feed === 'longpoll') {
    return next(); // it writes its first bytes as soon as it has looked
  }
  var opts = utils.makeOpts(req);
  req.db.info(opts).then(function () {
    var filter = req.query.filter;
    var name = filter === '_view' ? req.query.view : filter;
    if (typeof name !== 'string' || name.indexOf('/') === -1) {
      return null;
    }
    var parts = name.split('/');
    return req.db.get('_design/' + parts[0], utils.makeOpts(req)).then(function (ddoc) {
      var functions = filter === '_view' ? ddoc.views : ddoc.filters;
      var fun = functions && functions[parts[1]];
      if (!(filter === '_view' ? fun && typeof fun.map === 'string' : typeof fun === 'string')) {
        throw {status: 404, name: 'not_found', message: 'missing json key: ' + parts[1]};
      }
    });
  }).then(function () {
    req.afterFlushFeed = true;
    next();
  }, function (err) {
    sendError(res, (err && err.status) || 500, (err && err.name) || 'unknown_error',
              (err && err.message) || 'cannot follow the database');
  });
}

beforeRoutes('changes', function (app) {
  app.get('/:db/_changes', checkChangesFilter, checkFeed);
  app.post('/:db/_changes', checkChangesFilter, checkFeed);
});

// --- request bodies the routes cannot take: refused before they reach PouchDB ----------
//
// Each of these threw inside PouchDB. Thrown synchronously, Express answered a
// 500 HTML page; thrown in a callback, the process died (exit 70).

function isObject(value) {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function bulkCheck(countError) {
  return function (req, res, next) {
    var body = req.body;
    if (!isObject(body) || typeof body.docs === 'undefined') {
      return next(); // the route's own answers (400 "Missing JSON list of 'docs'", ...)
    }
    // `docs: 1` threw in pouchdb-wrappers (args.docs.map is not a function), `docs:
    // [null]` in pouchdb-security (doc._id of null), `docs: "x"` in bulkGet
    if (!Array.isArray(body.docs)) {
      return sendError(res, 400, 'bad_request', '`docs` parameter must be an array.');
    }
    if (!body.docs.every(isObject)) {
      return sendError(res, 400, 'bad_request', 'Document must be a JSON object');
    }
    if (body.docs.length > MAX_BULK_COUNT) {
      return sendError(res, 413, countError, String(MAX_BULK_COUNT));
    }
    next();
  };
}

beforeRoutes('bulk-docs', function (app) {
  app.post('/:db/_bulk_docs', utils.jsonParser, bulkCheck('max_bulk_docs_count_exceeded'));
});

// Only the members of a body that CouchDB reads reach PouchDB (CouchDB ignores the
// others too). PouchDB copied all of them, for `_all_docs` with keys once per key:
// 150 kB of anything else with 1,000 keys took 6 s, with 10,000 keys the heap.
var VIEW_PARAMS = [
  'conflicts', 'descending', 'endkey', 'end_key', 'endkey_docid', 'end_key_doc_id', 'group',
  'group_level', 'include_docs', 'attachments', 'att_encoding_info', 'inclusive_end', 'key',
  'keys', 'limit', 'reduce', 'skip', 'sorted', 'stable', 'stale', 'startkey', 'start_key',
  'startkey_docid', 'start_key_doc_id', 'update', 'update_seq'
];
var FIND_PARAMS = [
  'selector', 'limit', 'skip', 'sort', 'fields', 'use_index', 'r', 'bookmark', 'update',
  'stable', 'stale', 'execution_stats', 'conflicts'
];
var INDEX_PARAMS = ['index', 'ddoc', 'name', 'type', 'partitioned'];

function keepOnly(names) {
  return function (req, res, next) {
    if (isObject(req.body)) {
      Object.keys(req.body).forEach(function (name) {
        if (names.indexOf(name) === -1) {
          delete req.body[name];
        }
      });
    }
    next();
  };
}

beforeRoutes('all-docs', function (app) {
  app.all('/:db/_all_docs', utils.jsonParser, keepOnly(VIEW_PARAMS));
});
beforeRoutes('views', function (app) {
  app.all('/:db/_design/:id/_view/:view', utils.jsonParser, keepOnly(VIEW_PARAMS));
});
beforeRoutes('temp-views', function (app) {
  app.all('/:db/_temp_view', utils.jsonParser,
          keepOnly(VIEW_PARAMS.concat(['map', 'reduce', 'language', 'options'])));
});

// `_revs_diff` {"doc1": 1}: pouchdb-core's revsDiff called `revs.slice` on the
// number in a database callback (TypeError outside any handler: process exit).
beforeRoutes('revs-diff', function (app) {
  app.post('/:db/_revs_diff', utils.jsonParser, function (req, res, next) {
    var body = req.body;
    if (typeof body === 'undefined' || (isObject(body) && !Object.keys(body).length)) {
      return next();
    }
    if (!isObject(body)) {
      return sendError(res, 400, 'bad_request', 'Request body must be a JSON object');
    }
    for (var id in body) {
      if (Object.prototype.hasOwnProperty.call(body, id)) {
        var revs = body[id];
        if (!Array.isArray(revs) || !revs.every(function (rev) { return typeof rev === 'string'; })) {
          return sendError(res, 400, 'bad_request', 'Invalid revision list for ' + JSON.stringify(id));
        }
      }
    }
    next();
  });
});

// `_replicate` without a source or target: PouchDB.replicate threw "Missing/invalid
// DB name" synchronously (500 HTML page).
beforeRoutes('replicate', function (app) {
  app.post('/_replicate', utils.jsonParser, function (req, res, next) {
    var body = isObject(req.body) ? req.body : {};
    function endpoint(value) {
      return (typeof value === 'string' && value.length > 0) ||
        (isObject(value) && typeof value.url === 'string' && value.url.length > 0);
    }
    if (!endpoint(body.source) || !endpoint(body.target)) {
      return sendError(res, 400, 'bad_request',
                       '`source` and `target` must each be a database name or URL');
    }
    next();
  });
});

// --- routes/documents.js: multipart bodies ---------------------------------------------
//
// multiparty emits no 'close' after an 'error', and the routes answered only on
// 'close': a malformed multipart/form-data POST (`POST /db/<anything>`, which also
// catches `_purge`, `_missing_revs`, ...) or multipart/related PUT got no answer,
// ever. A multipart/related part that is not JSON threw in multiparty's 'field'
// event (process exit). Both are answered 400 now; the uploaded temporary files
// are removed once read (they were left in the temporary directory).

replaceInSource('express-pouchdb/lib/routes/documents.js', [[
  'function onPutOrPostResponse(req, res) {',
  [
    '// After\'s guard: a multipart body that cannot be read is answered at once.',
    'function refuseMultipart(res, reason) {',
    '  if (!res.headersSent) {',
    '    utils.sendJSON(res, 400, {error: "bad_request", reason: reason});',
    '  }',
    '}',
    '',
    'function readUpload(file) {',
    '  return readFile(file.path).then(function (body) {',
    '    fs.unlink(file.path, function () {});',
    '    return body;',
    '  });',
    '}',
    '',
    'function onPutOrPostResponse(req, res) {'
  ].join('\n')
], [[
  '    form.on(\'error\', function (err) {',
  '      promise = promise.then(function () {',
  '        throw err;',
  '      });',
  '    }).on(\'field\', function (name, field) {'
].join('\n'), [
  '    form.on(\'error\', function (err) {',
  '      refuseMultipart(res, \'invalid multipart/form-data body: \' + err.message);',
  '    }).on(\'field\', function (name, field) {'
].join('\n')], [[
  '      promise = promise.then(function () {',
  '        return readFile(file.path);',
  '      }).then(function (body) {',
  '        attachments[filename] = {'
].join('\n'), [
  '      promise = promise.then(function () {',
  '        return readUpload(file);',
  '      }).then(function (body) {',
  '        attachments[filename] = {'
].join('\n')], [[
  '      form.on(\'error\', function (err) {',
  '        promise = promise.then(function () {',
  '          throw err;',
  '        });',
  '      }).on(\'field\', function (_, field) {',
  '        doc = JSON.parse(field);',
  '      }).on(\'file\', function (_, file) {',
  '        var type = file.headers[\'content-type\'];',
  '        var filename = file.originalFilename;',
  '        promise = promise.then(function () {',
  '          return readFile(file.path);'
].join('\n'), [
  '      var invalid = false;',
  '      form.on(\'error\', function (err) {',
  '        refuseMultipart(res, \'invalid multipart/related body: \' + err.message);',
  '      }).on(\'field\', function (_, field) {',
  '        try {',
  '          doc = JSON.parse(field);',
  '        } catch (err) {',
  '          invalid = true;',
  '        }',
  '      }).on(\'file\', function (_, file) {',
  '        var type = file.headers[\'content-type\'];',
  '        var filename = file.originalFilename;',
  '        promise = promise.then(function () {',
  '          return readUpload(file);'
].join('\n')], [[
  '        promise.then(function () {',
  '          mergeAttachments(doc, attachments);'
].join('\n'), [
  '        if (invalid || !doc || typeof doc !== \'object\' || Array.isArray(doc)) {',
  '          return refuseMultipart(res, \'the document part must be a JSON object\');',
  '        }',
  '        promise.then(function () {',
  '          mergeAttachments(doc, attachments);'
].join('\n')]]);
applied['routes/documents multipart'] = true;

// --- the last resort: an exception a route threw is answered in JSON --------------------
//
// Express answered it with its HTML error page (500, the stack trace included). It
// is registered just before the 404 handler, after every route.
beforeRoutes('404', function (app) {
  app.use(function (err, req, res, next) { // four arguments: Express's error handler
    var status = (err && (err.status || err.statusCode)) || 500;
    if (!(status >= 400 && status < 600)) {
      status = 500;
    }
    log('error in ' + req.method + ' ' + req.url.split('?')[0] + ': ' + ((err && err.stack) || err));
    if (err instanceof RangeError) { // out of stack on a deeply nested key or body
      return sendError(res, 400, 'bad_request', err.message);
    }
    sendError(res, status, status === 500 ? 'unknown_error' : 'bad_request',
              (err && err.message) || String(err));
  });
});
