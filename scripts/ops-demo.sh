#!/usr/bin/env bash
# The session shown in docs/operations.md: a throwaway server in a loopback-only network
# namespace, a smart host that is down, and every operations command against it.
# Usage (root, with swaks installed): scripts/ops-demo.sh > /tmp/ops.txt
set -e
if [ "${1:-}" != "--inside" ]; then
  exec unshare -n "$0" --inside
fi
ip link set lo up
dir=$(mktemp -d /tmp/postroom-demo.XXXXXX)
cd "$dir"
cat > postroom.toml <<'T'
hostname = "mail.example.test"
data_dir = "postroom-data"
[smtp]
listen = ["127.0.0.1:2525"]
submission = ["127.0.0.1:2587"]
[domains]
local = ["example.test"]
[aliases]
"postmaster@example.test" = ["alice@example.test"]
[dns]
nameservers = ["127.0.0.1:9"]
[delivery]
retry = ["10m"]
[[route]]
match = "*"
via = "mx"
[[route]]
match = "partner.example"
via = "smarthost"
host = "127.0.0.1:2626"
tls = "none"
[admin]
listen = "127.0.0.1:8025"
T
echo s3cret | postroom users add alice@example.test --password-stdin >/dev/null
postroom serve -q > serve.out 2>&1 &
sleep 2
for i in 1 2 3; do swaks -S -S --server 127.0.0.1:2525 --from alice@example.test --to bob@partner.example --header "Subject: report $i" >/dev/null; done
swaks -S -S --server 127.0.0.1:2525 --from alice@example.test --to alice@example.test --header "Subject: hello" >/dev/null
sleep 2
run() { echo "\$ postroom $*"; postroom "$@" 2>&1 || true; echo; }
run status
run stop outbound-delivery
run queue
run queue reasons
ID=$(postroom queue list outbound-delivery --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["messages"][0]["id"])')
run queue list outbound-delivery --domain partner.example
run queue show $ID
run queue hold $ID
run queue release $ID
run queue retry --reason $(postroom queue reasons --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["reasons"][0]["id"])') --all
run start outbound-delivery
run logging
run logging set smtp_protocol maximum
swaks -S -S --server 127.0.0.1:2525 --from alice@example.test --to alice@example.test --header "Subject: logged" >/dev/null
sleep 1
echo '$ tail -n 4 postroom-data/logs/protocol.jsonl'; tail -n 4 postroom-data/logs/protocol.jsonl; echo
run logging set all minimum
printf 'Subject: nightly backup\n\nThe backup finished.\n' > msg.txt
echo '$ postroom sendmail -oi -f cron@example.test alice@example.test < msg.txt'; postroom sendmail -oi -f cron@example.test alice@example.test < msg.txt; echo
sleep 1
run events --since 10m
run events --severity warning
run trace $ID
run queue bounce --domain partner.example --all
sleep 1
run trace --rcpt bob@partner.example
echo "reload with a mistake:"; sed -i 's/^retry = \["10m"\]/retry = ["10 minutes"]/' postroom.toml
run reload
sed -i 's/^retry = \["10 minutes"\]/retry = ["10m"]/' postroom.toml
run reload
run stats
kill %1; wait
rm -rf "$dir"
