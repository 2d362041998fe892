#!/usr/bin/env bash
# Creates (or brings up to date) the Service Bus entities ordo needs, with the az CLI:
# a Standard namespace, a partitioned topic with duplicate detection, a session-enabled
# subscription, and least-privilege SAS rules; then writes each connection string to its own
# file (mode 0600) in a directory outside the repository. Safe to run again: existing
# entities are updated, not recreated, and an existing topic or subscription is checked for
# the settings that cannot change after creation.
# The Service Bus entities of main.bicep (Standard only; the Bicep also offers Premium, alerts,
# Key Vault and managed identities), for those who prefer plain az commands. With
# --producer-principal-id and --projector-principal-id it also gives the daemons' Entra ID
# identities their roles, as the Bicep's producerPrincipalId and projectorPrincipalId do.
#
#   deploy/azure/provision.sh --resource-group RG --namespace NAME [--location westeurope]
#
# Every flag can also come from the environment (in brackets below).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: provision.sh --resource-group RG --namespace NAME [options]

  --resource-group RG     resource group; created in --location when
                          missing, used wherever it is otherwise    [ORDO_AZ_RESOURCE_GROUP]
  --namespace NAME        globally unique namespace name             [ORDO_AZ_NAMESPACE]
  --location LOC          region of a new group and namespace
                          (default: the group's, else westeurope)    [ORDO_AZ_LOCATION]
  --topic NAME            topic (default ordo-events)                [ORDO_AZ_TOPIC]
  --subscription NAME     subscription (default projector)           [ORDO_AZ_SUBSCRIPTION]
  --max-size MB           topic size, 1024-5120 (default 5120)       [ORDO_AZ_MAX_SIZE_MB]
  --dedup-window ISO8601  duplicate detection window (default PT10M) [ORDO_AZ_DEDUP_WINDOW]
  --no-keda               do not create the Manage rule for KEDA     [ORDO_AZ_KEDA=false]
  --demo                  also create ordo-demo (Send and Listen), the one
                          connection string scripts/demo.sh and the tests
                          need; only in a namespace used for nothing else
                                                                     [ORDO_AZ_DEMO=true]
  --producer-principal-id ID
                          object id of ordo-producer's Entra ID identity:
                          Azure Service Bus Data Sender on the topic
                                                                     [ORDO_AZ_PRODUCER_PRINCIPAL_ID]
  --projector-principal-id ID
                          object id of ordo-projector's identity: Azure
                          Service Bus Data Receiver on the subscription
                                                                     [ORDO_AZ_PROJECTOR_PRINCIPAL_ID]
  --principal-type TYPE   ServicePrincipal (default: managed and workload
                          identities, app registrations), User or Group
                                                                     [ORDO_AZ_PRINCIPAL_TYPE]
  --out DIR               directory for the connection strings
                          (default ~/.config/ordo/NAMESPACE)         [ORDO_AZ_OUT]

Files written to DIR (mode 0600, directory 0700):
  servicebus-producer     Send-only connection string: /etc/ordo/creds/servicebus-producer
                          (systemd) or the Secret ordo-servicebus-producer (Kubernetes)
  servicebus-projector    Listen-only: servicebus-projector / ordo-servicebus-projector
  servicebus-keda         Manage, for KEDA's TriggerAuthentication only
  servicebus-demo         Send and Listen, with --demo only
  producer.env, projector.env
                          AZURE_SERVICEBUS_CONNECTION_STRING=… plus the entity names, for
                          an EnvironmentFile or `set -a; . FILE`
USAGE
}

rg="${ORDO_AZ_RESOURCE_GROUP:-}"
ns="${ORDO_AZ_NAMESPACE:-}"
location="${ORDO_AZ_LOCATION:-}"
topic="${ORDO_AZ_TOPIC:-ordo-events}"
subscription="${ORDO_AZ_SUBSCRIPTION:-projector}"
max_size="${ORDO_AZ_MAX_SIZE_MB:-5120}"
dedup_window="${ORDO_AZ_DEDUP_WINDOW:-PT10M}"
keda="${ORDO_AZ_KEDA:-true}"
demo="${ORDO_AZ_DEMO:-false}"
out="${ORDO_AZ_OUT:-}"
producer_principal="${ORDO_AZ_PRODUCER_PRINCIPAL_ID:-}"
projector_principal="${ORDO_AZ_PROJECTOR_PRINCIPAL_ID:-}"
principal_type="${ORDO_AZ_PRINCIPAL_TYPE:-ServicePrincipal}"
ttl="P14D"

while [ $# -gt 0 ]; do
  case "$1" in
    --resource-group) rg="$2"; shift 2 ;;
    --namespace) ns="$2"; shift 2 ;;
    --location) location="$2"; shift 2 ;;
    --topic) topic="$2"; shift 2 ;;
    --subscription) subscription="$2"; shift 2 ;;
    --max-size) max_size="$2"; shift 2 ;;
    --dedup-window) dedup_window="$2"; shift 2 ;;
    --no-keda) keda=false; shift ;;
    --demo) demo=true; shift ;;
    --out) out="$2"; shift 2 ;;
    --producer-principal-id) producer_principal="$2"; shift 2 ;;
    --projector-principal-id) projector_principal="$2"; shift 2 ;;
    --principal-type) principal_type="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "provision: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

if [ -z "$rg" ] || [ -z "$ns" ]; then
  echo "provision: --resource-group and --namespace are required" >&2
  usage >&2
  exit 2
fi
case "$max_size" in
  1024|2048|3072|4096|5120) ;;
  *) echo "provision: --max-size must be one of 1024 2048 3072 4096 5120" >&2; exit 2 ;;
esac
for id in "$producer_principal" "$projector_principal"; do
  if [ -n "$id" ] && ! [[ "$id" =~ ^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$ ]]; then
    echo "provision: principal id $id is not an object id (a GUID)" >&2
    exit 2
  fi
done
case "$principal_type" in
  ServicePrincipal|User|Group) ;;
  *) echo "provision: --principal-type must be ServicePrincipal, User or Group" >&2; exit 2 ;;
esac
command -v az >/dev/null || { echo "provision: the az CLI is required" >&2; exit 1; }

log() { echo "provision: $*" >&2; }
common=(--resource-group "$rg" --namespace-name "$ns" --only-show-errors --output none)

# `az group create` on an existing group in another region fails: only create a missing one.
if [ "$(az group exists --name "$rg" --only-show-errors)" = "true" ]; then
  group_location="$(az group show --name "$rg" --query location --output tsv --only-show-errors)"
  log "resource group $rg exists ($group_location)"
  location="${location:-$group_location}"
else
  location="${location:-westeurope}"
  log "creating resource group $rg ($location)"
  az group create --name "$rg" --location "$location" --only-show-errors --output none
fi
out="${out:-$HOME/.config/ordo/$ns}"

# Standard: the cheapest tier with topics and partitioned entities.
if az servicebus namespace show --resource-group "$rg" --name "$ns" --only-show-errors --output none 2>/dev/null; then
  log "namespace $ns exists"
else
  log "creating namespace $ns (Standard)"
  az servicebus namespace create --resource-group "$rg" --name "$ns" --location "$location" \
    --sku Standard --min-tls 1.2 --only-show-errors --output none
fi

# Partitioning and duplicate detection are fixed at creation: an existing topic is checked,
# then only its changeable settings are updated.
topic_settings=(--enable-duplicate-detection true
  --duplicate-detection-history-time-window "$dedup_window"
  --max-size "$max_size" --default-message-time-to-live "$ttl")
if az servicebus topic show "${common[@]}" --name "$topic" 2>/dev/null; then
  settings="$(az servicebus topic show --resource-group "$rg" --namespace-name "$ns" \
    --name "$topic" --query '[enablePartitioning, requiresDuplicateDetection]' --output tsv \
    --only-show-errors)"
  read -r partitioned dedup <<<"${settings//$'\n'/ }"
  if [ "$dedup" != "true" ]; then
    echo "provision: topic $topic exists without duplicate detection, which cannot be turned on later; this script sets up ordo's default layout, with it. ordo also works on such a topic (docs/prerequisites.md, Send mode): use it as it is without this script, or delete it or choose another --topic" >&2
    exit 1
  fi
  if [ "$partitioned" != "true" ]; then
    log "warning: topic $topic is not partitioned (fixed at creation); ordo works, with one partition's throughput"
  fi
  log "updating topic $topic"
  az servicebus topic update "${common[@]}" --name "$topic" \
    --default-message-time-to-live "$ttl" --max-size "$max_size" \
    --duplicate-detection-history-time-window "$dedup_window"
else
  log "creating partitioned topic $topic"
  az servicebus topic create "${common[@]}" --name "$topic" --enable-partitioning true \
    "${topic_settings[@]}"
fi

# Sessions are fixed at creation too.
sub_settings=(--lock-duration PT1M --max-delivery-count 10
  --enable-dead-lettering-on-message-expiration true --default-message-time-to-live "$ttl")
if az servicebus topic subscription show "${common[@]}" --topic-name "$topic" --name "$subscription" 2>/dev/null; then
  sessions="$(az servicebus topic subscription show --resource-group "$rg" --namespace-name "$ns" \
    --topic-name "$topic" --name "$subscription" --query requiresSession --output tsv --only-show-errors)"
  if [ "$sessions" != "true" ]; then
    echo "provision: subscription $subscription exists without sessions; ordo needs a session-enabled subscription" >&2
    exit 1
  fi
  log "updating subscription $subscription"
  az servicebus topic subscription update "${common[@]}" --topic-name "$topic" \
    --name "$subscription" "${sub_settings[@]}"
else
  log "creating session-enabled subscription $subscription"
  az servicebus topic subscription create "${common[@]}" --topic-name "$topic" \
    --name "$subscription" --enable-session true "${sub_settings[@]}"
fi

# Entra ID roles, least privilege: Data Sender on the topic, Data Receiver on the subscription
# (enough for the projector's status, repair and reconcile too). Ids of the built-in roles, from
# https://learn.microsoft.com/en-us/azure/role-based-access-control/built-in-roles/integration
# Creating an assignment that exists changes nothing.
assign_role() { # principal role-id role-name scope-id
  if [ -z "$4" ]; then
    echo "provision: could not read the resource id to assign $3 on" >&2
    exit 1
  fi
  log "role $3 for $1 on ${4#*/providers/Microsoft.ServiceBus/}"
  az role assignment create --assignee-object-id "$1" --assignee-principal-type "$principal_type" \
    --role "$2" --scope "$4" --only-show-errors --output none
}
if [ -n "$producer_principal" ]; then
  topic_id="$(az servicebus topic show --resource-group "$rg" --namespace-name "$ns" \
    --name "$topic" --query id --output tsv --only-show-errors)"
  assign_role "$producer_principal" 69a216fc-b8fb-44d8-bc22-1f3c2cd27a39 \
    "Azure Service Bus Data Sender" "$topic_id"
fi
if [ -n "$projector_principal" ]; then
  subscription_id="$(az servicebus topic subscription show --resource-group "$rg" \
    --namespace-name "$ns" --topic-name "$topic" --name "$subscription" --query id --output tsv \
    --only-show-errors)"
  assign_role "$projector_principal" 4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0 \
    "Azure Service Bus Data Receiver" "$subscription_id"
fi

# Least privilege, scoped to the topic. Creating an existing rule updates its rights.
rule() {
  local name="$1"
  shift
  log "SAS rule $name on $topic: $*"
  az servicebus topic authorization-rule create "${common[@]}" --topic-name "$topic" \
    --name "$name" --rights "$@"
}
connection_string() {
  az servicebus topic authorization-rule keys list --resource-group "$rg" --namespace-name "$ns" \
    --topic-name "$topic" --name "$1" --query primaryConnectionString --output tsv --only-show-errors
}
rule ordo-producer Send
rule ordo-projector Listen
if [ "$keda" = "true" ]; then
  # KEDA reads the backlog through the management API: Manage (which requires Listen and Send).
  rule ordo-keda Manage Listen Send
fi
if [ "$demo" = "true" ]; then
  # The demo and the tests run both daemons from one connection string.
  rule ordo-demo Send Listen
fi

# Every key is fetched before anything is written: a failed or empty answer stops the script
# (an assignment's status is the command substitution's, so set -e sees it).
producer_cs="$(connection_string ordo-producer)"
projector_cs="$(connection_string ordo-projector)"
keda_cs=""
if [ "$keda" = "true" ]; then
  keda_cs="$(connection_string ordo-keda)"
fi
for v in producer_cs projector_cs; do
  if [ -z "${!v}" ]; then
    echo "provision: could not read the ${v%_cs} connection string" >&2
    exit 1
  fi
done
if [ "$keda" = "true" ] && [ -z "$keda_cs" ]; then
  echo "provision: could not read the keda connection string" >&2
  exit 1
fi
demo_cs=""
if [ "$demo" = "true" ]; then
  demo_cs="$(connection_string ordo-demo)"
  [ -n "$demo_cs" ] || { echo "provision: could not read the demo connection string" >&2; exit 1; }
fi

umask 077
mkdir -p "$out"
chmod 0700 "$out"
write() { # file content: written next to the target, then moved, so no half-written secret
  local tmp
  tmp="$(mktemp "$out/.$1.XXXXXX")"
  printf '%s' "$2" >"$tmp"
  mv "$tmp" "$out/$1"
}
write servicebus-producer "$producer_cs"
write servicebus-projector "$projector_cs"
[ -z "$keda_cs" ] || write servicebus-keda "$keda_cs"
[ -z "$demo_cs" ] || write servicebus-demo "$demo_cs"
entities="AZURE_SERVICEBUS_TOPIC_NAME=$topic
AZURE_SERVICEBUS_SUBSCRIPTION_NAME=$subscription"
write producer.env "AZURE_SERVICEBUS_CONNECTION_STRING=$producer_cs
$entities
"
write projector.env "AZURE_SERVICEBUS_CONNECTION_STRING=$projector_cs
$entities
"
log "connection strings written to $out (mode 0600): servicebus-producer, servicebus-projector${keda_cs:+, servicebus-keda}${demo_cs:+, servicebus-demo}, producer.env, projector.env"
