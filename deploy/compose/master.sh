#!/bin/sh
# The master of compose.yaml: a bare repository with confcast's hooks, served by
# `git daemon` (fetch for the relays, push for you: the demo enables receive-pack
# without authentication, which a real master must not do; serve pushes over ssh or
# https there). On first start it is seeded with two datacenters, their configuration,
# and a service `web`.
set -eu
BASE=${CONFCAST_GIT_BASE:-/srv/git}
REPO=$BASE/master.git
NATS=${CONFCAST_NATS:?set CONFCAST_NATS to the hub servers, comma-separated}

if [ ! -d "$REPO" ]; then
  git init -q --bare "$REPO"
  # Records confcast.nats and confcast.replicas; the hooks create the commit stream
  # with 3 replicas on the hub cluster.
  publisher install-hooks "$REPO" --nats "$NATS" --replicas 3
  work=$(mktemp -d)
  cd "$work"
  git init -q . && git config user.name confcast && git config user.email confcast@example.invalid
  git remote add origin "$REPO"
  push() { git add -A && git commit -qm "$1" && git push -q origin "HEAD:refs/heads/$2"; }
  git switch -q --orphan datacenter-configuration/web
  echo '{ "services": [ { "name": "web", "branch": "master" } ] }' > datacenter-configuration.json
  push "web datacenters run the web service" datacenter-configuration/web
  git switch -q --orphan datacenters/dc1
  echo '{ "conf": "datacenter-configuration/web",
  "inventories": { "hosts": { "host-a": { "services": ["web"] }, "host-b": { "services": ["web"] } } } }' > datacenter.json
  push "dc1: host-a and host-b run web" datacenters/dc1
  git switch -q --orphan datacenters/dc2
  echo '{ "conf": "datacenter-configuration/web",
  "inventories": { "hosts": { "host-a": { "services": ["web"] } } } }' > datacenter.json
  push "dc2: host-a runs web" datacenters/dc2
  git switch -q --orphan services/web/master
  echo 'greeting = "hello"' > web.conf
  push "web: first configuration" services/web/master
  cd / && rm -rf "$work"
fi

exec git daemon --reuseaddr --export-all --enable=receive-pack \
  --base-path="$BASE" --listen=0.0.0.0 --port=9418 "$BASE"
