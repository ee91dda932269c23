#!/usr/bin/env bash
# Start (or stop) a local Ray head on loopback with the dashboard, job server and metrics endpoint, the way a laptop
# user runs the service with `ray job submit`; and, when the `prometheus` binary is installed (Debian's `prometheus`
# package, or your own), a Prometheus beside it that scrapes the service (docs/monitoring.md).
#
#   bash deploy/local_head.sh start        # dashboard + jobs: http://127.0.0.1:8265, metrics: :8080, Prometheus: :9090
#   RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
#       python -m learner.main --config configs/tiny.yaml
#   bash deploy/local_head.sh stop         # Prometheus (only the one started here), then Ray
#   bash deploy/local_head.sh stop-monitoring   # only that Prometheus
#
# Ray 2.60 turns on token authentication for clusters made with `ray start` (~/.ray/auth_token);
# clients need RAY_AUTH_MODE=token. Keep it on.
set -euo pipefail
cmd=${1:-start}
here=$(cd "$(dirname "$0")" && pwd)
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
METRICS_PORT=${METRICS_PORT:-8080}
PROMETHEUS_PORT=${PROMETHEUS_PORT:-9090}
NUM_CPUS=${NUM_CPUS:-$(nproc)}
RAY_TEMP_DIR=${RAY_TEMP_DIR:-/tmp/ray}
# Prometheus's config, data, log and pid file
MONITORING_DIR=${MONITORING_DIR:-$HOME/.cache/minillm-service/monitoring}
# more `ray start` flags, e.g. RAY_START_ARGS="--port 6380" beside another head
RAY_START_ARGS=${RAY_START_ARGS:-}
pidfile=$MONITORING_DIR/prometheus.pid

start_prometheus() {
  if ! command -v prometheus >/dev/null; then
    echo "prometheus not installed: no time series (apt-get install prometheus, or see docs/monitoring.md)"
    return 0
  fi
  if [[ -f $pidfile ]] && grep -qa -- "$MONITORING_DIR/prometheus.yml" "/proc/$(cat "$pidfile")/cmdline" 2>/dev/null; then
    echo "prometheus already running (pid $(cat "$pidfile")): http://127.0.0.1:$PROMETHEUS_PORT"
    return 0
  fi
  mkdir -p "$MONITORING_DIR/data"
  # the discovery file Ray keeps in its temp dir (targets: every node's metrics endpoint)
  sed "s#/tmp/ray/prom_metrics_service_discovery.json#$RAY_TEMP_DIR/prom_metrics_service_discovery.json#" \
    "$here/monitoring/prometheus.yml" >"$MONITORING_DIR/prometheus.yml"
  nohup prometheus --config.file="$MONITORING_DIR/prometheus.yml" --storage.tsdb.path="$MONITORING_DIR/data" \
    --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" >"$MONITORING_DIR/prometheus.log" 2>&1 &
  echo $! >"$pidfile"
  for _ in $(seq 30); do
    if curl -sf "http://127.0.0.1:$PROMETHEUS_PORT/-/ready" >/dev/null 2>&1; then
      echo "prometheus: http://127.0.0.1:$PROMETHEUS_PORT (graph: /graph?g0.expr=ray_distill_reverse_kl)"
      return 0
    fi
    sleep 1
  done
  echo "prometheus did not become ready on :$PROMETHEUS_PORT; its log: $MONITORING_DIR/prometheus.log" >&2
}

stop_prometheus() {
  # only the Prometheus this script started: its pid, checked against its command line (the pid may be reused)
  if [[ -f $pidfile ]]; then
    pid=$(cat "$pidfile")
    if grep -qa -- "$MONITORING_DIR/prometheus.yml" "/proc/$pid/cmdline" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      echo "prometheus (pid $pid) stopped"
    fi
    rm -f "$pidfile"
  fi
}

case "$cmd" in
  start)
    export VLLM_ENABLE_V1_MULTIPROCESSING=0
    # the dashboard's Metrics page asks this Prometheus (and a Grafana on :3000, when one runs) for its charts
    export RAY_PROMETHEUS_HOST=${RAY_PROMETHEUS_HOST:-http://127.0.0.1:$PROMETHEUS_PORT}
    # shellcheck disable=SC2086
    ray start --head --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
      --metrics-export-port "$METRICS_PORT" --num-cpus "$NUM_CPUS" --temp-dir "$RAY_TEMP_DIR" \
      --disable-usage-stats $RAY_START_ARGS
    echo "dashboard: http://127.0.0.1:$DASHBOARD_PORT   metrics: http://127.0.0.1:$METRICS_PORT/metrics"
    # the service's Grafana dashboard beside Ray's own, in the folder Ray provisions Grafana from
    dashboards=$RAY_TEMP_DIR/session_latest/metrics/grafana/dashboards
    if [[ -d $dashboards ]]; then
      cp "$here/monitoring/grafana_dashboard.json" "$dashboards/minillm_service_grafana_dashboard.json"
    fi
    start_prometheus
    ;;
  stop)
    stop_prometheus
    # Ray's stop is machine-wide: it ends every Ray on this host, not only the head started above
    ray stop --force
    ;;
  stop-monitoring)
    stop_prometheus
    ;;
  *)
    echo "usage: $0 start|stop|stop-monitoring" >&2
    exit 2
    ;;
esac
