#!/usr/bin/env bash
# Creates (or brings up to date) the Service Bus entities ordo needs, with the az CLI:
# a Standard namespace, a partitioned topic with duplicate detection, a session-enabled
# subscription, and least-privilege SAS rules; then writes the connection strings to an env
# file (mode 0600). Safe to run again: existing entities are updated, not recreated.
# The same resources as main.bicep, for those who prefer plain az commands.
#
#   deploy/azure/provision.sh --resource-group RG --namespace NAME [--location westeurope]
#
# Every flag can also come from the environment (in brackets below).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: provision.sh --resource-group RG --namespace NAME [options]

  --resource-group RG     resource group, created when missing      [ORDO_AZ_RESOURCE_GROUP]
  --namespace NAME        globally unique namespace name             [ORDO_AZ_NAMESPACE]
  --location LOC          region (default westeurope)                [ORDO_AZ_LOCATION]
  --topic NAME            topic (default ordo-events)                [ORDO_AZ_TOPIC]
  --subscription NAME     subscription (default projector)           [ORDO_AZ_SUBSCRIPTION]
  --max-size MB           topic size, 1024-5120 (default 5120)       [ORDO_AZ_MAX_SIZE_MB]
  --dedup-window ISO8601  duplicate detection window (default PT10M) [ORDO_AZ_DEDUP_WINDOW]
  --no-keda               do not create the Manage rule for KEDA     [ORDO_AZ_KEDA=false]
  --out FILE              env file for the connection strings
                          (default ./ordo-servicebus.env)            [ORDO_AZ_OUT]
USAGE
}

rg="${ORDO_AZ_RESOURCE_GROUP:-}"
ns="${ORDO_AZ_NAMESPACE:-}"
location="${ORDO_AZ_LOCATION:-westeurope}"
topic="${ORDO_AZ_TOPIC:-ordo-events}"
subscription="${ORDO_AZ_SUBSCRIPTION:-projector}"
max_size="${ORDO_AZ_MAX_SIZE_MB:-5120}"
dedup_window="${ORDO_AZ_DEDUP_WINDOW:-PT10M}"
keda="${ORDO_AZ_KEDA:-true}"
out="${ORDO_AZ_OUT:-./ordo-servicebus.env}"
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
    --out) out="$2"; shift 2 ;;
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
command -v az >/dev/null || { echo "provision: the az CLI is required" >&2; exit 1; }

log() { echo "provision: $*" >&2; }
common=(--resource-group "$rg" --namespace-name "$ns" --only-show-errors --output none)

log "resource group $rg ($location)"
az group create --name "$rg" --location "$location" --only-show-errors --output none

# Standard: the cheapest tier with topics and partitioned entities.
if az servicebus namespace show --resource-group "$rg" --name "$ns" --only-show-errors --output none 2>/dev/null; then
  log "namespace $ns exists"
else
  log "creating namespace $ns (Standard)"
  az servicebus namespace create --resource-group "$rg" --name "$ns" --location "$location" \
    --sku Standard --min-tls 1.2 --only-show-errors --output none
fi

# Partitioning is fixed at creation: an existing topic is only updated.
topic_settings=(--enable-duplicate-detection true
  --duplicate-detection-history-time-window "$dedup_window"
  --max-size "$max_size" --default-message-time-to-live "$ttl")
if az servicebus topic show "${common[@]}" --name "$topic" 2>/dev/null; then
  partitioned="$(az servicebus topic show --resource-group "$rg" --namespace-name "$ns" \
    --name "$topic" --query enablePartitioning --output tsv --only-show-errors)"
  if [ "$partitioned" != "true" ]; then
    echo "provision: topic $topic exists but is not partitioned; ordo needs a partitioned topic (delete it or choose another --topic)" >&2
    exit 1
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

umask 077
tmp="$(mktemp "${out}.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
{
  echo "# Written by deploy/azure/provision.sh for $ns/$topic/$subscription. Secrets: keep 0600."
  echo "AZURE_SERVICEBUS_TOPIC_NAME=$topic"
  echo "AZURE_SERVICEBUS_SUBSCRIPTION_NAME=$subscription"
  echo "# ordo-producer (Send only)"
  echo "ORDO_PRODUCER_SERVICEBUS_CONNECTION_STRING=$(connection_string ordo-producer)"
  echo "# ordo-projector (Listen only)"
  echo "ORDO_PROJECTOR_SERVICEBUS_CONNECTION_STRING=$(connection_string ordo-projector)"
  if [ "$keda" = "true" ]; then
    echo "# KEDA TriggerAuthentication only (Manage)"
    echo "ORDO_KEDA_SERVICEBUS_CONNECTION_STRING=$(connection_string ordo-keda)"
  fi
} >"$tmp"
mv "$tmp" "$out"
trap - EXIT
log "connection strings written to $out (mode 0600); give each daemon its own as AZURE_SERVICEBUS_CONNECTION_STRING"
