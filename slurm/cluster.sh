#!/usr/bin/env bash
# A throwaway one-node SLURM cluster on this machine, for the project's tests.
#
#   slurm/cluster.sh start    install packages if missing, write config, start the daemons,
#                             wait for an idle node; prints the partition name on stdout
#   slurm/cluster.sh stop     cancel jobs, stop the daemons it started (by pid file)
#   slurm/cluster.sh status   which daemons run, and sinfo (exit 0 when all of them run)
#
# Debian/Ubuntu, root, no systemd, no cgroups. Everything but munge (the system's socket and key)
# lives under $FNGD_SLURM_ROOT: config (etc/slurm.conf: point SLURM_CONF at it), state, logs,
# pid files, its own MariaDB. Ports FNGD_SLURM_PORT..+3 (slurmctld, slurmd, slurmdbd, mariadb).
# Config is rewritten on each start; a changed setting takes effect after stop + start.
# Progress goes to stderr. Exit 2 (one-line reason, last line of stderr): this machine cannot
# run it (not root, no apt-get, packages not installable), so tests skip. Exit 1: a daemon failed.
set -euo pipefail

ROOT=${FNGD_SLURM_ROOT:-/tmp/fngd-slurm}
PARTITION=${FNGD_SLURM_PARTITION:-debug}
GPUS=${FNGD_SLURM_GPUS:-2}          # fake GPUs (gres gpu); 0 = none
PORT=${FNGD_SLURM_PORT:-6917}
CLUSTER=fngd
PACKAGES="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
export SLURM_CONF=$ROOT/etc/slurm.conf   # daemons and clients of this script read this one

say() { echo "[cluster.sh $(date +%T)] $*" >&2; }
unusable() { echo "cluster.sh: $*" >&2; exit 2; }
broken() {  # broken <reason> [log]: show the log's tail, then the reason as the last line
  [ -n "${2:-}" ] && [ -f "$2" ] && tail -n 15 "$2" >&2
  echo "cluster.sh: $1${2:+ (see $2)}" >&2; exit 1
}
until_ok() {  # until_ok <seconds> <command...>: retry a command every 0.2 s
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.2
  done
}
# start a daemon without our lock fd 9 (else it holds the lock for as long as it lives)
daemon() { "$@" 9>&-; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }   # alive <pidfile>

install_packages() {
  local missing="" p
  for p in $PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  [ -z "$missing" ] && return 0
  command -v apt-get >/dev/null || unusable "SLURM packages missing ($missing) and no apt-get"
  say "installing$missing (log: $ROOT/log/apt.log)"
  # in containers policy-rc.d keeps the packages' own services down; we start ours below
  { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
  } >"$ROOT/log/apt.log" 2>&1 || unusable "apt-get could not install$missing (no package mirror?)"
}

write_config() {
  local etc=$ROOT/etc node hw gres="" i
  node=$(hostname -s)
  # what slurmd detects here, e.g. "CPUs=2 Boards=1 ... ThreadsPerCore=1 RealMemory=24105"
  hw=$(slurmd -C 2>/dev/null | head -1 | sed 's/^NodeName=[^ ]* //')
  [ -n "$hw" ] || broken "slurmd -C detected no hardware"
  if [ "$GPUS" -gt 0 ]; then
    # fake GPUs: char devices (same major/minor as /dev/null) that the gpu gres plugin hands
    # out, so --gpus-per-node schedules and jobs get CUDA_VISIBLE_DEVICES
    for ((i = 0; i < GPUS; i++)); do
      [ -c "$ROOT/dev/gpu$i" ] || mknod "$ROOT/dev/gpu$i" c 1 3
    done
    gres="Gres=gpu:fake:$GPUS"
    echo "NodeName=$node Name=gpu Type=fake File=$ROOT/dev/gpu[0-$((GPUS - 1))]" >"$etc/gres.conf"
  else
    : >"$etc/gres.conf"
  fi
  cat >"$etc/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again cred_expire+1 s after it ended: 11 s instead of 121 s
AuthInfo=cred_expire=10
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
# no cgroups: plain process tracking, no task containment
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
# accounting through slurmdbd: sacct is how submitit sees CANCELLED / TIMEOUT / FAILED
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$((PORT + 2))
AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/none
# cores and memory are consumable; without a default per CPU each job takes the whole node
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
# start jobs at submit time and look at pending (e.g. requeued) jobs every 2 s, not every 30-60 s
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2,bf_interval=2
# scontrol requeue (what submitit's Checkpointable does on USR2) needs nothing more than this
JobRequeue=1
PreemptType=preempt/none
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
KillWait=5
MinJobAge=300
InactiveLimit=0
Waittime=0
MessageTimeout=10
GresTypes=gpu
NodeName=$node NodeAddr=127.0.0.1 $hw $gres State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=$((PORT + 2))
SlurmUser=root
LogFile=$ROOT/log/slurmdbd.log
PidFile=$ROOT/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((PORT + 3))
StorageUser=slurm
StoragePass=fngd
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$etc/slurmdbd.conf"
  # plain `sinfo` in a shell finds this cluster too, unless another slurm.conf is there
  if [ ! -e /etc/slurm/slurm.conf ] || [ "$(readlink /etc/slurm/slurm.conf)" = "$etc/slurm.conf" ]; then
    mkdir -p /etc/slurm && ln -sfn "$etc/slurm.conf" /etc/slurm/slurm.conf
  fi
}

start_munge() {
  # the system's munge (default socket and key): slurm's clients do not all honour another socket
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0   # already up (ours or the system's)
  if [ ! -s /etc/munge/munge.key ]; then
    install -d -o munge -g munge -m 700 /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 755 /run/munge /var/lib/munge /var/log/munge
  daemon runuser -u munge -- munged || broken "munged failed" /var/log/munge/munged.log
  until_ok 10 bash -c "munge -n | unmunge" || broken "munged does not answer" /var/log/munge/munged.log
  cp /run/munge/munged.pid "$ROOT/run/munged.pid"   # we started it, so stop stops it
}

start_mariadb() {
  local data=$ROOT/mysql sock=$ROOT/run/mysql.sock
  if [ ! -d "$data/mysql" ]; then
    mariadb-install-db --user=root --datadir="$data" --auth-root-authentication-method=socket \
      --skip-test-db >"$ROOT/log/mariadb-install.log" 2>&1 ||
      broken "mariadb-install-db failed" "$ROOT/log/mariadb-install.log"
  fi
  if ! alive "$ROOT/run/mariadb.pid"; then
    mariadbd --user=root --datadir="$data" --socket="$sock" --pid-file="$ROOT/run/mariadb.pid" \
      --bind-address=127.0.0.1 --port=$((PORT + 3)) --log-error="$ROOT/log/mariadb.log" \
      --skip-name-resolve --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 \
      </dev/null >/dev/null 2>&1 9>&- &
    until_ok 60 mariadb-admin --socket="$sock" ping || broken "mariadb did not start" "$ROOT/log/mariadb.log"
  fi
  mariadb --socket="$sock" -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'fngd';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

start() {
  [ -d /run/systemd/system ] && say "note: systemd is running; this script starts its own daemons anyway"
  local t0=$SECONDS fresh=0
  mkdir -p "$ROOT"/{etc,state,spool,log,run,dev}
  install_packages
  write_config
  start_munge
  start_mariadb
  if ! alive "$ROOT/run/slurmdbd.pid"; then
    daemon slurmdbd || broken "slurmdbd failed" "$ROOT/log/slurmdbd.log"
  fi
  until_ok 60 sacctmgr -n list cluster || broken "slurmdbd does not answer" "$ROOT/log/slurmdbd.log"
  # register the cluster (and with it root's association to the root account) before slurmctld
  if ! sacctmgr -n -P list cluster format=cluster | grep -x "$CLUSTER" >/dev/null; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || broken "sacctmgr add cluster failed"
  fi
  if ! alive "$ROOT/run/slurmctld.pid"; then
    fresh=1; daemon slurmctld || broken "slurmctld failed" "$ROOT/log/slurmctld.log"
  fi
  if ! alive "$ROOT/run/slurmd.pid"; then
    fresh=1; daemon slurmd || broken "slurmd failed" "$ROOT/log/slurmd.log"
  fi
  local node; node=$(hostname -s)
  until_ok 60 bash -c "sinfo -h -n '$node' -o %t | grep -Eq '^(idle|mix|alloc)'" || {
    # a node left down/drained by an earlier run: give it back once
    scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
    until_ok 20 bash -c "sinfo -h -n '$node' -o %t | grep -Eq '^(idle|mix|alloc)'"
  } || broken "node $node is not idle: $(sinfo -h -N -o '%t %E' 2>&1 | head -1)" "$ROOT/log/slurmd.log"
  if [ "$fresh" = 1 ]; then
    # one tiny job end to end, and wait for its record in accounting (what submitit reads)
    local job
    job=$(sbatch --parsable --wait -p "$PARTITION" -t 1 -o /dev/null -e /dev/null --wrap true) ||
      broken "the smoke-test job failed" "$ROOT/log/slurmctld.log"
    until_ok 30 bash -c "sacct -n -X -j '$job' -o State | grep -q COMPLETED" ||
      broken "job $job never reached accounting" "$ROOT/log/slurmdbd.log"
  fi
  say "cluster up in $((SECONDS - t0)) s: $(sinfo -h -N -o '%N %P %t cpus=%c mem=%m %G'); SLURM_CONF=$SLURM_CONF"
  echo "$PARTITION"
}

stop_daemons() {  # stop_daemons <name>...: TERM them all (pid files in run/), wait up to 10 s, KILL
  local name pids=() i
  for name in "$@"; do
    alive "$ROOT/run/$name.pid" && { pids+=("$(cat "$ROOT/run/$name.pid")"); kill "${pids[-1]}"; say "stopping $name"; }
    rm -f "$ROOT/run/$name.pid"
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  for ((i = 0; i < 100; i++)); do kill -0 "${pids[@]}" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "${pids[@]}" 2>/dev/null || true
}

stop() {
  if alive "$ROOT/run/slurmctld.pid"; then   # jobs first, so no slurmstepd outlives slurmd
    squeue -h -o %i | xargs -r scancel --quiet >/dev/null 2>&1 || true
    until_ok 15 bash -c '[ -z "$(squeue -h -o %i)" ]' || say "jobs still listed: $(squeue -h -o '%i %T' | tr '\n' ' ')"
  fi
  stop_daemons slurmd slurmctld slurmdbd   # (slurmctld keeps what slurmdbd missed for next time)
  stop_daemons mariadb munged
}

status() {
  local f down=0
  for f in run/munged.pid run/mariadb.pid run/slurmdbd.pid run/slurmctld.pid run/slurmd.pid; do
    if alive "$ROOT/$f"; then echo "up    $f ($(cat "$ROOT/$f"))"; else echo "down  $f"; down=1; fi
  done
  echo "SLURM_CONF=$SLURM_CONF"
  [ "$down" = 0 ] && sinfo -N -o '%N %P %t %c %m %G'
  return "$down"
}

case "${1:-}" in
  start | stop)
    [ "$(id -u)" = 0 ] || unusable "must run as root (it installs packages and runs slurmd as root)"
    mkdir -p "$ROOT"
    exec 9>"$ROOT/lock"   # one start/stop at a time (e.g. parallel test sessions)
    flock -w 600 9 || broken "another cluster.sh has held $ROOT/lock for 10 minutes"
    "$1" ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 64 ;;
esac
