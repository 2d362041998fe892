// Service Bus for ordo: a Standard or Premium namespace, a topic (duplicate detection on by
// default; duplicateDetection=false trades it for batched sends, see its description), a
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
// Microsoft Entra ID instead of keys: producerPrincipalId and projectorPrincipalId give the
// daemons' identities (managed identities, AKS workload identities, app registrations) Azure
// Service Bus Data Sender on the topic and Data Receiver on the subscription; createIdentities
// creates two user-assigned identities for them. docs/operations.md, "Microsoft Entra ID
// instead of keys", walks through both.
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

@description('Duplicate detection on the topic (fixed at creation). On: re-published events inside the window are dropped by the broker, and a partitioned topic refuses batches, so the producer sends one message per transfer (send_mode = "auto" falls back by itself). Off: batches, several times the publish rate; re-published events reach the projectors, whose version guard drops them (ordo_duplicates_total). docs/prerequisites.md, "Send mode".')
param duplicateDetection bool = true

@description('Duplicate detection window (ISO 8601), with duplicateDetection. MessageId is "{aggregateId}:{eventId}", so re-published events inside the window are dropped by the broker.')
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

@description('Object (principal) id of the identity ordo-producer runs as: gets Azure Service Bus Data Sender on the topic. Empty: no role assignment.')
param producerPrincipalId string = ''

@description('Object (principal) id of the identity ordo-projector (and its status, repair and reconcile commands) runs as: gets Azure Service Bus Data Receiver on the subscription. Empty: no role assignment.')
param projectorPrincipalId string = ''

@description('Kind of producerPrincipalId and projectorPrincipalId. Managed identities, AKS workload identities and app registrations are all ServicePrincipal.')
@allowed(['ServicePrincipal', 'User', 'Group'])
param principalType string = 'ServicePrincipal'

@description('Create the user-assigned managed identities NAMESPACE-ordo-producer and NAMESPACE-ordo-projector with the same two roles; their client and principal ids are outputs. Independent of producerPrincipalId and projectorPrincipalId.')
param createIdentities bool = false

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
    requiresDuplicateDetection: duplicateDetection
    duplicateDetectionHistoryTimeWindow: duplicateDetection ? duplicateDetectionWindow : null
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

// Entra ID roles, least privilege: Data Sender on the topic for the producer, Data Receiver on
// the subscription for the projector (receiving, settling, renewing session locks and peeking
// at the dead-letter queue, which is all `status`, `repair` and `reconcile` need). Role ids of
// the built-in roles, from
// https://learn.microsoft.com/en-us/azure/role-based-access-control/built-in-roles/integration#azure-service-bus-data-sender
// https://learn.microsoft.com/en-us/azure/role-based-access-control/built-in-roles/integration#azure-service-bus-data-receiver
var dataSenderRoleId = subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '69a216fc-b8fb-44d8-bc22-1f3c2cd27a39')
var dataReceiverRoleId = subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0')

resource producerSender 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(producerPrincipalId)) {
  name: guid(topic.id, producerPrincipalId, dataSenderRoleId)
  scope: topic
  properties: {
    roleDefinitionId: dataSenderRoleId
    principalId: producerPrincipalId
    principalType: principalType
  }
}

resource projectorReceiver 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(projectorPrincipalId)) {
  name: guid(subscription.id, projectorPrincipalId, dataReceiverRoleId)
  scope: subscription
  properties: {
    roleDefinitionId: dataReceiverRoleId
    principalId: projectorPrincipalId
    principalType: principalType
  }
}

// Optional identities for the daemons. Their principal ids exist only once they are created,
// so the assignments' names use the identities' resource ids, which are known in advance.
// AKS workload identity also needs a federated credential on each (docs/operations.md).
resource producerIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = if (createIdentities) {
  name: '${namespaceName}-ordo-producer'
  location: location
}

resource projectorIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = if (createIdentities) {
  name: '${namespaceName}-ordo-projector'
  location: location
}

resource producerIdentitySender 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (createIdentities) {
  name: guid(topic.id, producerIdentity.id, dataSenderRoleId)
  scope: topic
  properties: {
    roleDefinitionId: dataSenderRoleId
    principalId: producerIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource projectorIdentityReceiver 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (createIdentities) {
  name: guid(subscription.id, projectorIdentity.id, dataReceiverRoleId)
  scope: subscription
  properties: {
    roleDefinitionId: dataReceiverRoleId
    principalId: projectorIdentity.properties.principalId
    principalType: 'ServicePrincipal'
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

// Identifiers, not secrets. With createIdentities: the client ids go into the ServiceAccount
// annotations of deploy/k8s/overlays/workload-identity; otherwise empty.
output producerIdentityClientId string = createIdentities ? producerIdentity.properties.clientId : ''
output producerIdentityPrincipalId string = createIdentities ? producerIdentity.properties.principalId : ''
output projectorIdentityClientId string = createIdentities ? projectorIdentity.properties.clientId : ''
output projectorIdentityPrincipalId string = createIdentities ? projectorIdentity.properties.principalId : ''
