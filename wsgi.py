"""The WSGI entry point: ``gunicorn -c gunicorn.conf.py wsgi:app``.

No monkey-patching here: gunicorn's gevent worker patches before it imports this.
"""

from gateway import create_app

app = create_app()
