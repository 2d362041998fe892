//! Declarative projections, read from TOML and checked at start.
//!
//! ```toml
//! [[projections]]
//! name = "users"
//! collection = "users"
//! aggregate_types = ["User"]
//!
//! [[projections.on.UserRegistered]]
//! set = { email = "$payload.email", status = "active", registeredAt = "$timestamp" }
//!
//! [[projections.on.UserDeactivated]]
//! set = { status = "inactive" }
//! unset = ["email"]
//! ```
//!
//! `on.<EventType>` is a list of operation tables; a table may hold several operators, applied
//! in the order `set`, `unset`, `inc`, `push`, `pull`, `delete`. An event type with no rule
//! only advances `lastEventId`. A projection selects events by `aggregate_types` when given,
//! otherwise by the event types it has rules for. Every mistake (unknown operator, bad path,
//! wrong value type) fails at start naming the projection, the event type and the key; only
//! what depends on an event's content (a missing `$payload` field, a non-number for `inc`) is
//! left to apply time, where it is a poison event.

use std::collections::{BTreeMap, BTreeSet};

use mongodb::bson::{Bson, Document};
use serde::{Deserialize, Serialize};

use super::error::{ApplyError, RuleError};
use super::fold::{event_version, Projection};
use super::value::{FieldPath, ValueExpr};

/// The whole `projections.toml`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectionsFile {
    /// Every projection this deployment maintains.
    #[serde(default)]
    pub projections: Vec<ProjectionDef>,
}

/// One projection as written in TOML.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectionDef {
    /// Unique name (`rebuild --projection NAME`, `ordo_blocked.projection`).
    pub name: String,
    /// The read-model collection; one projection owns it.
    pub collection: String,
    /// Aggregate types whose events this projection reads; empty: select by `on` event types.
    #[serde(default)]
    pub aggregate_types: Vec<String>,
    /// Event type → operations.
    #[serde(default)]
    pub on: BTreeMap<String, Vec<toml::Table>>,
}

/// The operators a rule may use, in the order they are applied within one table.
pub const OPERATORS: &[&str] = &["set", "unset", "inc", "push", "pull", "delete"];

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Set(Vec<(FieldPath, ValueExpr)>),
    Unset(Vec<FieldPath>),
    Inc(Vec<(FieldPath, ValueExpr)>),
    Push(Vec<(FieldPath, ValueExpr)>),
    Pull(Vec<(FieldPath, ValueExpr)>),
    Delete,
}

/// A compiled declarative projection.
#[derive(Debug, Clone)]
pub struct DeclarativeProjection {
    name: String,
    collection: String,
    aggregate_types: BTreeSet<String>,
    rules: BTreeMap<String, Vec<Op>>,
}

impl ProjectionsFile {
    /// Parses and compiles `projections.toml`.
    pub fn load_str(text: &str) -> Result<Vec<DeclarativeProjection>, RuleError> {
        let file: ProjectionsFile = toml::from_str(text).map_err(|e| RuleError {
            projection: "<file>".into(),
            event_type: None,
            key: "projections".into(),
            message: e.to_string().replace('\n', " ").trim().to_string(),
        })?;
        file.compile()
    }

    /// Compiles every projection; names and collections must be unique.
    pub fn compile(&self) -> Result<Vec<DeclarativeProjection>, RuleError> {
        let mut names = BTreeSet::new();
        let mut collections = BTreeSet::new();
        let mut out = Vec::new();
        for (i, def) in self.projections.iter().enumerate() {
            let p = def.compile().map_err(|mut e| {
                if e.projection.is_empty() {
                    e.projection = format!("#{i}");
                }
                e
            })?;
            let err = |key: &str, message: String| RuleError {
                projection: def.name.clone(),
                event_type: None,
                key: key.into(),
                message,
            };
            if !names.insert(p.name.clone()) {
                return Err(err("name", "is used by another projection".into()));
            }
            if !collections.insert(p.collection.clone()) {
                return Err(err(
                    "collection",
                    format!("`{}` is owned by another projection", p.collection),
                ));
            }
            out.push(p);
        }
        Ok(out)
    }
}

impl ProjectionDef {
    /// Compiles one projection, checking every key.
    pub fn compile(&self) -> Result<DeclarativeProjection, RuleError> {
        let err = |event_type: Option<&str>, key: String, message: String| RuleError {
            projection: self.name.clone(),
            event_type: event_type.map(str::to_string),
            key,
            message,
        };
        if self.name.is_empty() {
            return Err(err(None, "name".into(), "must not be empty".into()));
        }
        if self.collection.is_empty()
            || self.collection.starts_with("system.")
            || self.collection.contains(['$', '\0'])
            || self.collection.starts_with("ordo_")
        {
            return Err(err(
                None,
                "collection".into(),
                format!(
                    "{:?} is not a usable collection name (empty, system., $, or ordo_ which is reserved)",
                    self.collection
                ),
            ));
        }
        if self.aggregate_types.is_empty() && self.on.is_empty() {
            return Err(err(
                None,
                "aggregate_types".into(),
                "give aggregate_types or at least one `on` rule, or the projection selects nothing"
                    .into(),
            ));
        }
        let mut rules = BTreeMap::new();
        for (event_type, tables) in &self.on {
            let mut ops = Vec::new();
            for (i, table) in tables.iter().enumerate() {
                let at = |k: &str| format!("on.{event_type}[{i}].{k}");
                for key in table.keys() {
                    if !OPERATORS.contains(&key.as_str()) {
                        return Err(err(
                            Some(event_type),
                            at(key),
                            format!(
                                "unknown operator (expected one of: {})",
                                OPERATORS.join(", ")
                            ),
                        ));
                    }
                }
                if table.is_empty() {
                    return Err(err(
                        Some(event_type),
                        format!("on.{event_type}[{i}]"),
                        "has no operator".into(),
                    ));
                }
                for op in OPERATORS {
                    let Some(v) = table.get(*op) else { continue };
                    let compiled = compile_op(op, v).map_err(|(k, m)| {
                        err(
                            Some(event_type),
                            if k.is_empty() {
                                at(op)
                            } else {
                                at(&format!("{op}.{k}"))
                            },
                            m,
                        )
                    })?;
                    ops.push(compiled);
                }
            }
            rules.insert(event_type.clone(), ops);
        }
        Ok(DeclarativeProjection {
            name: self.name.clone(),
            collection: self.collection.clone(),
            aggregate_types: self.aggregate_types.iter().cloned().collect(),
            rules,
        })
    }
}

fn field_values(v: &toml::Value) -> Result<Vec<(FieldPath, ValueExpr)>, (String, String)> {
    let toml::Value::Table(t) = v else {
        return Err((
            String::new(),
            format!("expected a table of field = value, got {v}"),
        ));
    };
    t.iter()
        .map(|(k, v)| {
            let path = FieldPath::parse(k).map_err(|m| (k.clone(), m))?;
            let value = ValueExpr::compile(v).map_err(|m| (k.clone(), m))?;
            Ok((path, value))
        })
        .collect()
}

fn compile_op(op: &str, v: &toml::Value) -> Result<Op, (String, String)> {
    Ok(match op {
        "set" => Op::Set(field_values(v)?),
        "push" => Op::Push(field_values(v)?),
        "pull" => Op::Pull(field_values(v)?),
        "inc" => {
            let fields = field_values(v)?;
            for (path, value) in &fields {
                if let ValueExpr::Literal(b) = value {
                    if as_number(b).is_none() {
                        return Err((
                            path.text.clone(),
                            format!("inc needs a number or a $-path, got {b}"),
                        ));
                    }
                } else if !matches!(value, ValueExpr::Path(_)) {
                    return Err((path.text.clone(), "inc needs a number or a $-path".into()));
                }
            }
            Op::Inc(fields)
        }
        "unset" => {
            let toml::Value::Array(items) = v else {
                return Err((
                    String::new(),
                    format!("expected an array of field names, got {v}"),
                ));
            };
            Op::Unset(
                items
                    .iter()
                    .map(|i| match i {
                        toml::Value::String(s) => FieldPath::parse(s).map_err(|m| (s.clone(), m)),
                        other => {
                            Err((String::new(), format!("expected a field name, got {other}")))
                        }
                    })
                    .collect::<Result<_, _>>()?,
            )
        }
        "delete" => match v {
            toml::Value::Boolean(true) => Op::Delete,
            other => {
                return Err((
                    String::new(),
                    format!("expected `delete = true`, got {other}"),
                ))
            }
        },
        _ => unreachable!("operators are checked first"),
    })
}

#[derive(Clone, Copy)]
enum Num {
    Int(i64),
    Float(f64),
}

fn as_number(b: &Bson) -> Option<Num> {
    match b {
        Bson::Int32(v) => Some(Num::Int(i64::from(*v))),
        Bson::Int64(v) => Some(Num::Int(*v)),
        Bson::Double(v) => Some(Num::Float(*v)),
        _ => None,
    }
}

fn to_f64(n: Num) -> f64 {
    match n {
        Num::Int(i) => i as f64,
        Num::Float(f) => f,
    }
}

/// Equality for `pull`: numbers compare by value whatever their BSON width; a document pattern
/// matches an element that has all the pattern's fields.
fn matches(pattern: &Bson, element: &Bson) -> bool {
    match (pattern, element) {
        (Bson::Document(p), Bson::Document(e)) => p
            .iter()
            .all(|(k, pv)| e.get(k).is_some_and(|ev| matches(pv, ev))),
        (a, b) => match (as_number(a), as_number(b)) {
            (Some(x), Some(y)) => to_f64(x) == to_f64(y),
            _ => a == b,
        },
    }
}

impl DeclarativeProjection {
    fn apply_op(
        &self,
        op: &Op,
        doc: &mut Option<Document>,
        event: &Document,
    ) -> Result<(), String> {
        match op {
            Op::Set(fields) => {
                let d = doc.get_or_insert_with(Document::new);
                for (path, value) in fields {
                    path.set(d, value.eval(event)?)?;
                }
            }
            Op::Unset(paths) => {
                if let Some(d) = doc {
                    for p in paths {
                        p.remove(d);
                    }
                }
            }
            Op::Inc(fields) => {
                let d = doc.get_or_insert_with(Document::new);
                for (path, value) in fields {
                    let by = value.eval(event)?;
                    let n = as_number(&by)
                        .ok_or_else(|| format!("inc.{}: {} is not a number", path.text, by))?;
                    let slot = path.entry(d, Bson::Int64(0))?;
                    let cur = as_number(slot).ok_or_else(|| {
                        format!(
                            "inc.{}: the document holds {}, not a number",
                            path.text, slot
                        )
                    })?;
                    *slot = match (cur, n) {
                        (Num::Int(a), Num::Int(b)) => Bson::Int64(a.wrapping_add(b)),
                        (a, b) => Bson::Double(to_f64(a) + to_f64(b)),
                    };
                }
            }
            Op::Push(fields) => {
                let d = doc.get_or_insert_with(Document::new);
                for (path, value) in fields {
                    let v = value.eval(event)?;
                    match path.entry(d, Bson::Array(Vec::new()))? {
                        Bson::Array(a) => a.push(v),
                        other => {
                            return Err(format!(
                                "push.{}: the document holds {}, not an array",
                                path.text, other
                            ))
                        }
                    }
                }
            }
            Op::Pull(fields) => {
                if let Some(d) = doc {
                    for (path, value) in fields {
                        let pattern = value.eval(event)?;
                        match path.get(d) {
                            None => {}
                            Some(Bson::Array(_)) => {
                                if let Ok(Bson::Array(a)) = path.entry(d, Bson::Null) {
                                    a.retain(|e| !matches(&pattern, e));
                                }
                            }
                            Some(other) => {
                                return Err(format!(
                                    "pull.{}: the document holds {}, not an array",
                                    path.text, other
                                ))
                            }
                        }
                    }
                }
            }
            Op::Delete => *doc = None,
        }
        Ok(())
    }
}

impl Projection for DeclarativeProjection {
    fn name(&self) -> &str {
        &self.name
    }

    fn collection(&self) -> &str {
        &self.collection
    }

    fn selects(&self, aggregate_type: Option<&str>, event_type: &str) -> bool {
        if self.aggregate_types.is_empty() {
            self.rules.contains_key(event_type)
        } else {
            aggregate_type.is_some_and(|t| self.aggregate_types.contains(t))
        }
    }

    fn apply(&self, doc: &mut Option<Document>, event: &Document) -> Result<(), ApplyError> {
        let event_type = event.get_str("eventType").unwrap_or_default();
        let Some(ops) = self.rules.get(event_type) else {
            return Ok(());
        };
        // Work on a copy: a rule that fails halfway must leave the model as it was.
        let mut next = doc.clone();
        for op in ops {
            self.apply_op(op, &mut next, event)
                .map_err(|message| ApplyError {
                    projection: self.name.clone(),
                    event_type: event_type.to_string(),
                    event_id: event_version(event),
                    message,
                })?;
        }
        *doc = next;
        Ok(())
    }
}
