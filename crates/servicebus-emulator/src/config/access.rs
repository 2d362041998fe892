//! Who may do what on the emulated namespace: shared access authorization rules (keys and
//! their rights) and, in place of Microsoft Entra ID, a trusted token issuer with data-plane
//! role assignments.

use serde::{Deserialize, Serialize};

/// The token issuer the emulator trusts in place of Microsoft Entra ID, and the data-plane
/// role assignments of the namespace.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EntraConfig {
    /// The `iss` claim tokens must carry.
    pub issuer: String,
    /// PEM public key (P-256, SubjectPublicKeyInfo) the issuer signs ES256 tokens with.
    pub public_key: std::path::PathBuf,
    /// Who may do what on the namespace.
    #[serde(default)]
    pub role_assignments: Vec<RoleAssignment>,
}

/// A role assigned to a principal at namespace scope.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RoleAssignment {
    /// The principal's object id (the token's `oid` claim).
    pub principal_id: String,
    /// The built-in role.
    pub role: DataRole,
}

/// Service Bus's built-in data-plane roles.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum DataRole {
    /// Send to topics and queues.
    #[serde(rename = "Azure Service Bus Data Sender")]
    Sender,
    /// Receive from subscriptions and queues.
    #[serde(rename = "Azure Service Bus Data Receiver")]
    Receiver,
    /// Both, and management.
    #[serde(rename = "Azure Service Bus Data Owner")]
    Owner,
}

/// A right of an authorization rule.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum AccessRight {
    /// Send to topics and queues.
    Send,
    /// Receive from subscriptions and queues.
    Listen,
    /// Everything (implies Send and Listen).
    Manage,
}

/// A named key with its rights (Azure: a shared access authorization rule).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationRule {
    /// Key name (`skn` in a SAS token).
    pub name: String,
    /// The key tokens are signed with (Azure: the rule's primary key).
    pub key: String,
    /// A second key valid next to `key` (Azure: the rule's secondary key). Service Bus gives
    /// every shared access authorization rule two keys so clients can move to one while the
    /// other is regenerated ("Service Bus access control with Shared Access Signatures",
    /// learn.microsoft.com/azure/service-bus-messaging/service-bus-sas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary_key: Option<String>,
    /// What tokens signed with either key may do.
    pub rights: Vec<AccessRight>,
}
