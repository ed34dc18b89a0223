#!/usr/bin/env bash
# Install Strata on one node of the VM cluster (cluster/vm/strata-cluster.yaml runs it):
#   bash ~/strata/cluster/vm/setup_node.sh head|cpu|gpu
# Idempotent: `ray up` runs it again on every update.
set -euo pipefail

role=${1:?usage: setup_node.sh head|cpu|gpu}
venv="$HOME/strata-venv"

sudo apt-get update -qq
sudo apt-get install -y -qq python3-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
# Every node runs the same Ray, the one the head's autoscaler expects.
"$venv/bin/pip" install --quiet 'ray[serve]==2.60.0'

cd "$HOME/strata"
case "$role" in
  head)
    # boto3: the autoscaler launches the EC2 workers. No torch: building the app never imports it.
    "$venv/bin/pip" install --quiet -e '.[postgres,cloud]' 'boto3>=1.26'
    ;;
  cpu)
    # The ingress never imports torch.
    "$venv/bin/pip" install --quiet -e '.[postgres,cloud]'
    ;;
  gpu)
    "$venv/bin/pip" install --quiet torch==2.13.0
    "$venv/bin/pip" install --quiet -e '.[models,gpu,postgres,cloud]'
    # The weights into HF_HOME before Ray starts here, so no replica waits on a 55 GB download.
    set -a
    # shellcheck source=/dev/null
    . "$HOME/strata.env"
    set +a
    "$venv/bin/python" scripts/fetch_models.py --config configs/cluster.yaml
    ;;
  *)
    echo "unknown role: $role (head, cpu or gpu)" >&2
    exit 2
    ;;
esac
