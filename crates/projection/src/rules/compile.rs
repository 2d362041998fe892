//! Checking and compiling `projections.toml`: every mistake fails here, at start, naming the
//! projection, the event type and the key.

use std::collections::{BTreeMap, BTreeSet};

use super::apply::as_number;
use super::{DeclarativeProjection, Op, ProjectionDef, ProjectionsFile, OPERATORS};
use crate::error::RuleError;
use crate::value::{FieldPath, ValueExpr};

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
        if self.name.is_empty() {
            return Err(self.error(None, "name".into(), "must not be empty".into()));
        }
        if self.collection.is_empty()
            || self.collection.starts_with("system.")
            || self.collection.contains(['$', '\0'])
            || self.collection.starts_with("ordo_")
        {
            return Err(self.error(
                None,
                "collection".into(),
                format!(
                    "{:?} is not a usable collection name (empty, system., $, or ordo_ which is reserved)",
                    self.collection
                ),
            ));
        }
        if self.aggregate_types.is_empty() && self.on.is_empty() {
            return Err(self.error(
                None,
                "aggregate_types".into(),
                "give aggregate_types or at least one `on` rule, or the projection selects nothing"
                    .into(),
            ));
        }
        let mut rules = BTreeMap::new();
        for (event_type, tables) in &self.on {
            rules.insert(event_type.clone(), self.compile_rule(event_type, tables)?);
        }
        Ok(DeclarativeProjection {
            name: self.name.clone(),
            collection: self.collection.clone(),
            aggregate_types: self.aggregate_types.iter().cloned().collect(),
            rules,
        })
    }

    /// Compiles the operation tables of `on.<event_type>`, in order.
    fn compile_rule(&self, event_type: &str, tables: &[toml::Table]) -> Result<Vec<Op>, RuleError> {
        let mut ops = Vec::new();
        for (i, table) in tables.iter().enumerate() {
            let at = |k: &str| format!("on.{event_type}[{i}].{k}");
            for key in table.keys() {
                if !OPERATORS.contains(&key.as_str()) {
                    return Err(self.error(
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
                return Err(self.error(
                    Some(event_type),
                    format!("on.{event_type}[{i}]"),
                    "has no operator".into(),
                ));
            }
            for op in OPERATORS {
                let Some(v) = table.get(*op) else { continue };
                let compiled = compile_op(op, v).map_err(|(k, m)| {
                    self.error(
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
        Ok(ops)
    }

    fn error(&self, event_type: Option<&str>, key: String, message: String) -> RuleError {
        RuleError {
            projection: self.name.clone(),
            event_type: event_type.map(str::to_string),
            key,
            message,
        }
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
