"""`leanlm serve --replicas N`: copies of the server on Ray Serve behind one OpenAI-compatible endpoint.

routing.py   which replica a request prefers (prompt prefix -> replica, least loaded otherwise): Serve's router
metrics.py   one Prometheus text out of every replica's
asgi.py      a request run through the ordinary leanlm app (server/app.py) inside a replica
deployment.py the Serve deployments (Replica, Frontend) and `serve_replicas`, which starts or joins a Ray cluster
"""
