"""The HTTP side of the server, beside gRPC: Starlette routes on uvicorn, on the same event
loop as the gRPC server, over TLS with the same server certificate. `app.py` builds the
application from route providers; `server.py` runs it."""
