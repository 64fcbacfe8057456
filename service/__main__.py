"""``python -m service``: start the server with settings from ``AUTOQ_*`` environment variables."""

from service.main import serve

if __name__ == "__main__":
    serve()
