#!/usr/bin/env bash
# Start (or stop) a local Ray head on loopback with the dashboard, job server and metrics endpoint,
# the way a laptop user runs the service with `ray job submit`.
#
#   bash deploy/local_head.sh start        # dashboard + jobs: http://127.0.0.1:8265, metrics: :8080
#   RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
#       python -m learner.main --config configs/tiny.yaml
#   bash deploy/local_head.sh stop
#
# Ray 2.60 turns on token authentication for clusters made with `ray start` (~/.ray/auth_token);
# clients need RAY_AUTH_MODE=token. Keep it on.
set -euo pipefail
cmd=${1:-start}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
METRICS_PORT=${METRICS_PORT:-8080}
NUM_CPUS=${NUM_CPUS:-$(nproc)}
case "$cmd" in
  start)
    export VLLM_ENABLE_V1_MULTIPROCESSING=0
    ray start --head --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
      --metrics-export-port "$METRICS_PORT" --num-cpus "$NUM_CPUS" --disable-usage-stats
    echo "dashboard: http://127.0.0.1:$DASHBOARD_PORT   metrics: http://127.0.0.1:$METRICS_PORT/metrics"
    ;;
  stop)
    # Ray's stop is machine-wide: it ends every Ray on this host, not only the head started above
    ray stop --force
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
