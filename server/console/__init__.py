"""The coordinator's console: one read-only web page (and Prometheus ``/metrics``) of a run folder.

``cxr-fl-server console --run-dir RUN`` serves it, and ``cxr-fl-server start`` serves it beside
the run unless told not to, always on 127.0.0.1 (never on the sites' address), behind a random
token that only the owner's terminal sees. What it shows is what the coordinator already holds:

- server/console/run_state.py reads the run folder (metrics.jsonl, checkpoints/state.json,
  run_config.json, events.jsonl, summary.json, sites.json, deploy.json) into one snapshot;
- server/console/gateway_log.py counts the calls the Fleet gateway refused (gateway.log);
- server/console/nodes.py asks the run's loopback SuperLink which sites are online;
- server/console/page.py and server/console/curves.py render the snapshot as HTML and SVG;
- server/console/prometheus.py renders it in Prometheus' text format;
- server/console/web.py is the Starlette app (token, loopback-only checks) and its server.
"""
