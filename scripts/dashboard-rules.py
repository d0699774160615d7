#!/usr/bin/env python3
"""Print the PromQL queries of a Grafana dashboard as a Prometheus recording-rules file, so that
`promtool check rules` parses every query (CI: .ci/run). Grafana's variables are replaced by values that
parse: $__rate_interval and $__interval by 5m, $__range by 1h, other $variables by ".*"."""
import json
import re
import sys

dashboard = json.load(open(sys.argv[1]))
rules = []


def panels(items):
    for p in items:
        yield p
        yield from panels(p.get("panels", []))


for panel in panels(dashboard.get("panels", [])):
    for target in panel.get("targets", []):
        expr = target.get("expr")
        if not expr:
            continue
        expr = re.sub(r"\$__(rate_interval|interval)", "5m", expr)
        expr = expr.replace("$__range", "1h")
        expr = re.sub(r"\$\{?[A-Za-z_]+\}?", ".*", expr)
        rules.append({"record": f"dashboard:panel_{panel['id']}:{target.get('refId', 'A')}", "expr": expr})

if not rules:
    sys.exit("no queries found in the dashboard")
print(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}, indent=2))
