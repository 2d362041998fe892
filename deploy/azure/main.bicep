// Service Bus for ordo: a Standard namespace, a partitioned topic with duplicate detection, a
// session-enabled subscription for the projectors, and least-privilege SAS rules.
//
//   az deployment group create -g RG --template-file deploy/azure/main.bicep \
//     --parameters namespaceName=NAME
//
// Partitioning: on Standard it is a property of the entity (16 partitions) and cannot be changed
// after creation. Premium partitions whole namespaces instead (premiumMessagingPartitions);
// this template targets Standard.

@description('Globally unique namespace name (6-50 characters).')
@minLength(6)
@maxLength(50)
param namespaceName string

@description('Region of the namespace.')
param location string = resourceGroup().location

@description('Topic between ordo-producer and ordo-projector (config: servicebus.topic).')
param topicName string = 'ordo-events'

@description('Session-enabled subscription read by ordo-projector (config: servicebus.subscription).')
param subscriptionName string = 'projector'

@description('Topic size in megabytes; on a partitioned Standard topic each of the 16 partitions gets this much.')
@allowed([1024, 2048, 3072, 4096, 5120])
param maxSizeInMegabytes int = 5120

@description('Duplicate detection window (ISO 8601). MessageId is "{aggregateId}:{eventId}", so re-published events inside the window are dropped by the broker.')
param duplicateDetectionWindow string = 'PT10M'

@description('Time a message may wait before it expires and is dead-lettered (ISO 8601).')
param messageTimeToLive string = 'P14D'

@description('Create the Manage rule that KEDA needs to read the subscription backlog.')
param createKedaRule bool = true

resource namespace 'Microsoft.ServiceBus/namespaces@2021-11-01' = {
  name: namespaceName
  location: location
  sku: {
    name: 'Standard'
    tier: 'Standard'
  }
  properties: {
    minimumTlsVersion: '1.2'
  }
}

resource topic 'Microsoft.ServiceBus/namespaces/topics@2021-11-01' = {
  parent: namespace
  name: topicName
  properties: {
    enablePartitioning: true
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

output namespaceHost string = '${namespace.name}.servicebus.windows.net'
output topicEntityName string = topic.name
output subscriptionEntityName string = subscription.name

// Connection strings for AZURE_SERVICEBUS_CONNECTION_STRING (or the mounted secret files).
// They are secrets: read them once into a secret store and do not keep deployment history
// that shows them.
#disable-next-line outputs-should-not-contain-secrets
output producerConnectionString string = producerRule.listKeys().primaryConnectionString
#disable-next-line outputs-should-not-contain-secrets
output projectorConnectionString string = projectorRule.listKeys().primaryConnectionString
#disable-next-line outputs-should-not-contain-secrets
output kedaConnectionString string = createKedaRule ? kedaRule.listKeys().primaryConnectionString : ''
