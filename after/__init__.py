"""After: cron no more. Schedule your tasks over HTTP, with CouchDB as the only server."""

__version__ = "0.1.0"
