#!/bin/bash
# Start inboxd's loopback mail stack: OAuth2 server (11080), Dovecot IMAP/IMAPS/LMTP (11143/11993/11024),
# Postfix submission (11587, SASL via Dovecot) and inbound SMTP (11025). Needs root (Postfix master, mail uid).
# Idempotent: a healthy stack started from these same files is left alone; a half-up or stale one is restarted.
# MAILSTACK_ROOT (default /tmp/inboxd-mailstack) receives the rendered configs, TLS cert, mail and logs.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
M=${MAILSTACK_ROOT:-/tmp/inboxd-mailstack}
T0=$(date +%s%N)

install_packages() {
  local pkgs=(dovecot-imapd dovecot-lmtpd postfix openssl)
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "${pkgs[@]}" >"$M/log/apt.log" 2>&1 \
    || { apt-get update -q >>"$M/log/apt.log" 2>&1 && apt-get install -y -q "${pkgs[@]}" >>"$M/log/apt.log" 2>&1; } \
    || { echo "mailstack: apt-get install failed, see $M/log/apt.log" >&2; exit 1; }
  # the distro instances would listen on the standard ports; ours are started by hand below
  if [ -d /run/systemd/system ]; then systemctl disable --now dovecot postfix >>"$M/log/apt.log" 2>&1 || true; fi
}

mkdir -p "$M"/{log,run,state/dovecot,mail,postfix,postfix-spool,postfix-data,tls}
# concurrent test runs share one stack: one starter at a time
exec 9>"$M/run/start.lock"
flock 9

if [ ! -x /usr/sbin/dovecot ] || [ ! -x /usr/lib/dovecot/imap ] || [ ! -x /usr/lib/dovecot/lmtp ] \
   || [ ! -x /usr/sbin/postfix ] || ! command -v openssl >/dev/null; then
  install_packages
fi

# the stack must have been started from exactly these files, else it is stale
STAMP=$(cat "$HERE"/start.sh "$HERE"/dovecot.conf "$HERE"/dovecot-oauth2.conf.ext "$HERE"/users.passwd \
  "$HERE"/postfix/main.cf "$HERE"/postfix/master.cf "$HERE"/oauth_server.py | sha256sum | cut -d' ' -f1)
if [ "$(cat "$M/run/stamp" 2>/dev/null)" = "$STAMP" ] && python3 "$HERE/ready.py" --timeout 0 --since "$T0"; then
  exit 0
fi
"$HERE/stop.sh"

for f in dovecot.conf dovecot-oauth2.conf.ext users.passwd postfix/main.cf postfix/master.cf; do
  sed "s#@ROOT@#$M#g" "$HERE/$f" > "$M/$f"
done
[ -f "$M/tls/cert.pem" ] || openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=localhost \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:127.0.0.2,IP:127.0.0.3" \
  -keyout "$M/tls/key.pem" -out "$M/tls/cert.pem" 2>/dev/null
chmod 0644 "$M/tls/cert.pem"
# Dovecot fails on the first mkdir (while login still "succeeds") unless mail is owned by mail:mail
chown mail:mail "$M/mail" && chmod 0770 "$M/mail"
chown postfix:postfix "$M/postfix-data"

python3 "$HERE/oauth_server.py" --port 11080 --pidfile "$M/run/oauth.pid" ${OAUTH_ARGS:-} \
  </dev/null >>"$M/log/oauth.log" 2>&1 9>&- &
# a daemonized Dovecot keeps inherited stdio open: a caller reading our output through a pipe would hang
# (and the lock fd 9 would stay held by the daemons forever)
/usr/sbin/dovecot -c "$M/dovecot.conf" </dev/null >>"$M/log/dovecot-stdio.log" 2>&1 9>&-
# `postfix start` sleeps ~1-2 s in postfix-script; it is only needed once to lay out the queue directory
if [ -d "$M/postfix-spool/maildrop" ]; then
  strace -f -tt -o /tmp/pf.strace /usr/lib/postfix/sbin/master -c "$M/postfix" -w </dev/null >>"$M/log/postfix-start.log" 2>&1 9>&-
else
  /usr/sbin/postfix -c "$M/postfix" start </dev/null >>"$M/log/postfix-start.log" 2>&1 9>&-
fi
if python3 "$HERE/ready.py" --timeout 30 --since "$T0"; then
  echo "$STAMP" > "$M/run/stamp"
else
  echo "mailstack: see $M/log/" >&2
  tail -n 20 "$M/log/dovecot.log" "$M/log/postfix.log" "$M/log/oauth.log" >&2 2>/dev/null || true
  exit 1
fi
