// Service Bus for ordo: a Standard or Premium namespace, a topic with duplicate detection, a
// session-enabled subscription for the projectors, least-privilege SAS rules, Azure Monitor
// alerts on what only the broker sees (its own dead-lettering, throttling, server errors,
// topic size) and, optionally, diagnostic settings and Key Vault secrets.
//
//   az deployment group create -g RG --template-file deploy/azure/main.bicep \
//     --parameters namespaceName=NAME [sku=Premium] [keyVaultName=VAULT] [actionGroupId=ID]
//
// Partitioning: on Standard it is a property of the topic (16 partitions), chosen at creation
// and never changed. On Premium the namespace is partitioned at creation
// (premiumMessagingPartitions) and its entities follow. Partitioning is for throughput and
// availability; ordo's ordering comes from sessions, not from partitions.
//
// No connection string leaves this template as an output: deployment outputs stay readable in
// the resource group's deployment history. With keyVaultName set, the three connection strings
// are written to that vault as secrets; otherwise read them with
//   az servicebus topic authorization-rule keys list -g RG --namespace-name NAME \
//     --topic-name ordo-events --name ordo-producer --query primaryConnectionString -o tsv

@description('Globally unique namespace name (6-50 characters).')
@minLength(6)
@maxLength(50)
param namespaceName string

@description('Region of the namespace.')
param location string = resourceGroup().location

@description('Standard (shared capacity, 256 KB messages) or Premium (dedicated messaging units, 1 MB messages by default, private endpoints, availability zones).')
@allowed(['Standard', 'Premium'])
param sku string = 'Standard'

@description('Premium only: messaging units.')
@allowed([1, 2, 4, 8, 16])
param premiumMessagingUnits int = 1

@description('Premium only: partitions of the namespace, fixed at creation (1 = not partitioned).')
@allowed([1, 2, 4])
param premiumMessagingPartitions int = 1

@description('Topic between ordo-producer and ordo-projector (config: servicebus.topic).')
param topicName string = 'ordo-events'

@description('Session-enabled subscription read by ordo-projector (config: servicebus.subscription).')
param subscriptionName string = 'projector'

@description('Topic size in megabytes; on a partitioned Standard topic each of the 16 partitions gets this much. Standard allows up to 5120, Premium up to 81920.')
@allowed([1024, 2048, 3072, 4096, 5120, 10240, 20480, 40960, 81920])
param maxSizeInMegabytes int = 5120

@description('Duplicate detection window (ISO 8601). MessageId is "{aggregateId}:{eventId}", so re-published events inside the window are dropped by the broker.')
param duplicateDetectionWindow string = 'PT10M'

@description('Time a message may wait before it expires and is dead-lettered (ISO 8601).')
param messageTimeToLive string = 'P14D'

@description('Create the Manage rule that KEDA needs to read the subscription backlog.')
param createKedaRule bool = true

@description('Existing Key Vault (same resource group) that receives the connection strings as secrets ordo-servicebus-producer, -projector, -keda. Empty: no secrets are written.')
param keyVaultName string = ''

@description('Action group (resource id) notified by the metric alerts. Empty: the alerts fire without notifying anyone.')
param actionGroupId string = ''

@description('Log Analytics workspace (resource id) for the namespace logs and metrics. Empty: no diagnostic settings.')
param logAnalyticsWorkspaceId string = ''

@description('Topic size, in bytes, above which the size alert fires (default 80 % of 5120 MB).')
param sizeAlertBytes int = 4294967296

var premium = sku == 'Premium'

resource namespace 'Microsoft.ServiceBus/namespaces@2021-11-01' = {
  name: namespaceName
  location: location
  sku: {
    name: sku
    tier: sku
    capacity: premium ? premiumMessagingUnits : null
  }
  properties: {
    minimumTlsVersion: '1.2'
    premiumMessagingPartitions: premium ? premiumMessagingPartitions : null
  }
}

resource topic 'Microsoft.ServiceBus/namespaces/topics@2021-11-01' = {
  parent: namespace
  name: topicName
  properties: {
    // Entity-level partitioning exists on Standard only; Premium partitions the namespace.
    enablePartitioning: !premium
    requiresDuplicateDetection: true
    duplicateDetectionHistoryTimeWindow: duplicateDetectionWindow
    maxSizeInMegabytes: maxSizeInMegabytes
    defaultMessageTimeToLive: messageTimeToLive
    enableBatchedOperations: true
  }
}

resource subscription 'Microsoft.ServiceBus/namespaces/topics/subscriptions@2021-11-01' = {
  parent: topic
  name: subscriptionName
  properties: {
    // One session = one aggregate: in-order, one consumer at a time.
    requiresSession: true
    // The projector renews the session lock between batches.
    lockDuration: 'PT1M'
    maxDeliveryCount: 10
    deadLetteringOnMessageExpiration: true
    deadLetteringOnFilterEvaluationExceptions: true
    defaultMessageTimeToLive: messageTimeToLive
    enableBatchedOperations: true
  }
}

// Send only, scoped to the topic: the producer can publish and nothing else.
resource producerRule 'Microsoft.ServiceBus/namespaces/topics/authorizationRules@2021-11-01' = {
  parent: topic
  name: 'ordo-producer'
  properties: {
    rights: [
      'Send'
    ]
  }
}

// Listen only, scoped to the topic (subscriptions have no rules of their own): the projector
// can receive and settle messages of the topic's subscriptions and nothing else.
resource projectorRule 'Microsoft.ServiceBus/namespaces/topics/authorizationRules@2021-11-01' = {
  parent: topic
  name: 'ordo-projector'
  properties: {
    rights: [
      'Listen'
    ]
  }
}

// KEDA reads message counts through the management API, which requires Manage (and Manage
// requires Listen and Send). Give this one to KEDA only, never to the daemons.
resource kedaRule 'Microsoft.ServiceBus/namespaces/topics/authorizationRules@2021-11-01' = if (createKedaRule) {
  parent: topic
  name: 'ordo-keda'
  properties: {
    rights: [
      'Manage'
      'Listen'
      'Send'
    ]
  }
}

// Alerts on what ordo cannot see. The projector counts only the messages it dead-letters
// itself (ordo_dead_lettered_total); Service Bus dead-letters by itself on MaxDeliveryCount and
// on expiry, and those show only here. Runbook: docs/operations.md, "Messages the broker
// dead-lettered".
var alertActions = empty(actionGroupId) ? [] : [
  {
    actionGroupId: actionGroupId
  }
]
var metricAlerts = [
  {
    name: 'dead-lettered'
    description: 'Messages are in the dead-letter queue of the ordo topic (by the projector or by Service Bus itself).'
    metric: 'DeadletteredMessages'
    aggregation: 'Maximum'
    threshold: 0
    severity: 2
    entity: true
  }
  {
    name: 'throttled'
    description: 'Service Bus throttles ordo: the namespace is at its capacity (Standard) or messaging units (Premium).'
    metric: 'ThrottledRequests'
    aggregation: 'Total'
    threshold: 0
    severity: 3
    entity: false
  }
  {
    name: 'server-errors'
    description: 'Service Bus returns server errors; ordo retries them, but they delay every event.'
    metric: 'ServerErrors'
    aggregation: 'Total'
    threshold: 0
    severity: 3
    entity: false
  }
  {
    name: 'size'
    description: 'The ordo topic is filling up: the projectors are not keeping up or are down.'
    metric: 'Size'
    aggregation: 'Maximum'
    threshold: sizeAlertBytes
    severity: 2
    entity: true
  }
]

resource alerts 'Microsoft.Insights/metricAlerts@2018-03-01' = [for a in metricAlerts: {
  name: '${namespaceName}-${a.name}'
  location: 'global'
  properties: {
    description: a.description
    severity: a.severity
    enabled: true
    scopes: [
      namespace.id
    ]
    evaluationFrequency: 'PT1M'
    windowSize: 'PT5M'
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: a.metric
          metricName: a.metric
          metricNamespace: 'Microsoft.ServiceBus/namespaces'
          operator: 'GreaterThan'
          threshold: a.threshold
          timeAggregation: a.aggregation
          dimensions: a.entity ? [
            {
              name: 'EntityName'
              operator: 'Include'
              values: [
                topicName
              ]
            }
          ] : []
        }
      ]
    }
    actions: alertActions
  }
}]

resource diagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = if (!empty(logAnalyticsWorkspaceId)) {
  name: 'ordo'
  scope: namespace
  properties: {
    workspaceId: logAnalyticsWorkspaceId
    logs: [
      {
        categoryGroup: 'allLogs'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'AllMetrics'
        enabled: true
      }
    ]
  }
}

// Connection strings go to Key Vault, never to outputs.
resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = if (!empty(keyVaultName)) {
  name: empty(keyVaultName) ? 'unused' : keyVaultName
}

resource producerSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = if (!empty(keyVaultName)) {
  parent: vault
  name: 'ordo-servicebus-producer'
  properties: {
    value: producerRule.listKeys().primaryConnectionString
  }
}

resource projectorSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = if (!empty(keyVaultName)) {
  parent: vault
  name: 'ordo-servicebus-projector'
  properties: {
    value: projectorRule.listKeys().primaryConnectionString
  }
}

resource kedaSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = if (!empty(keyVaultName) && createKedaRule) {
  parent: vault
  name: 'ordo-servicebus-keda'
  properties: {
    value: kedaRule.listKeys().primaryConnectionString
  }
}

output namespaceHost string = '${namespace.name}.servicebus.windows.net'
output topicEntityName string = topic.name
output subscriptionEntityName string = subscription.name
