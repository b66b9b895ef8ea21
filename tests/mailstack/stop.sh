#!/bin/bash
# Stop only what start.sh started, by PID (TERM to each master), and wait until they are gone.
M=${MAILSTACK_ROOT:-/tmp/inboxd-mailstack}
rm -f "$M/run/stamp"
# a zombie still answers kill -0; PID 1 in a container may reap late, so look at the process state
alive() { local st; st=$(ps -o stat= -p "$1" 2>/dev/null) && [ -n "$st" ] && [ "${st:0:1}" != Z ]; }
pidfiles=("$M/run/dovecot/master.pid" "$M/postfix-spool/pid/master.pid" "$M/run/oauth.pid")
for f in "${pidfiles[@]}"; do
  [ -f "$f" ] && kill -TERM "$(tr -d ' ' < "$f")" 2>/dev/null
done
for _ in $(seq 200); do
  alive=0
  for f in "${pidfiles[@]}"; do
    [ -f "$f" ] && alive "$(tr -d ' ' < "$f")" && alive=1
  done
  [ $alive = 0 ] && break
  sleep 0.05
done
rm -f "$M/run/oauth.pid"
exit 0
