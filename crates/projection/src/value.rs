//! Values of declarative rules and the paths they read and write.
//!
//! A rule value is a literal (any TOML value) or a `$`-path into the event, e.g.
//! `"$payload.email"`, `"$eventId"`, `"$timestamp"`; `"$$"` starts a literal string beginning
//! with `$`. Tables and arrays are resolved element by element, so
//! `{ sku = "$payload.sku", qty = 1 }` builds a document from the event. Paths are checked when
//! the rules are loaded; only whether the event actually has the field is left to apply time.

use mongodb::bson::{Bson, Document};

pub use crate::fold::RESERVED_FIELDS;

/// The event fields a `$`-path may start with (see `Envelope::to_event_document`).
pub const EVENT_ROOTS: &[&str] = &[
    "payload",
    "eventId",
    "eventType",
    "aggregateId",
    "aggregateType",
    "timestamp",
];

/// A `$`-path into the event document, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct EventPath {
    /// The path as written, without the `$`.
    pub text: String,
    segments: Vec<String>,
}

impl EventPath {
    /// Parses `payload.email` (the text after `$`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let segments: Vec<String> = text.split('.').map(str::to_string).collect();
        if segments.iter().any(String::is_empty) {
            return Err(format!("`${text}` has an empty path segment"));
        }
        let root = segments[0].as_str();
        if !EVENT_ROOTS.contains(&root) {
            return Err(format!(
                "`${text}` does not start with an event field (one of: {})",
                EVENT_ROOTS.join(", ")
            ));
        }
        if root != "payload" && segments.len() > 1 {
            return Err(format!("`${text}`: only `$payload` has nested fields"));
        }
        Ok(Self {
            text: text.to_string(),
            segments,
        })
    }

    /// The value at this path in `event`, if present (null counts as absent).
    pub fn get<'a>(&self, event: &'a Document) -> Option<&'a Bson> {
        get_path(event, &self.segments)
    }
}

fn get_path<'a>(doc: &'a Document, segments: &[String]) -> Option<&'a Bson> {
    let (first, rest) = segments.split_first()?;
    let v = doc.get(first)?;
    if rest.is_empty() {
        return (!matches!(v, Bson::Null)).then_some(v);
    }
    match v {
        Bson::Document(d) => get_path(d, rest),
        _ => None,
    }
}

/// A rule value: a literal, a path into the event, or a document/array of those.
#[derive(Debug, Clone, PartialEq)]
pub enum ValueExpr {
    /// Used as is.
    Literal(Bson),
    /// Read from the event.
    Path(EventPath),
    /// A document whose values are expressions.
    Doc(Vec<(String, ValueExpr)>),
    /// An array whose elements are expressions.
    Array(Vec<ValueExpr>),
}

impl ValueExpr {
    /// Compiles a TOML value; errors describe the problem without the key (the caller adds it).
    pub fn compile(v: &toml::Value) -> Result<Self, String> {
        Ok(match v {
            toml::Value::String(s) if s.starts_with("$$") => {
                ValueExpr::Literal(Bson::String(s[1..].to_string()))
            }
            toml::Value::String(s) if s.starts_with('$') => {
                ValueExpr::Path(EventPath::parse(&s[1..])?)
            }
            toml::Value::String(s) => ValueExpr::Literal(Bson::String(s.clone())),
            toml::Value::Integer(i) => ValueExpr::Literal(Bson::Int64(*i)),
            toml::Value::Float(f) => ValueExpr::Literal(Bson::Double(*f)),
            toml::Value::Boolean(b) => ValueExpr::Literal(Bson::Boolean(*b)),
            toml::Value::Datetime(d) => ValueExpr::Literal(Bson::String(d.to_string())),
            toml::Value::Array(a) => {
                ValueExpr::Array(a.iter().map(ValueExpr::compile).collect::<Result<_, _>>()?)
            }
            toml::Value::Table(t) => ValueExpr::Doc(
                t.iter()
                    .map(|(k, v)| {
                        if k.starts_with('$') || k.contains('.') || k.is_empty() {
                            return Err(format!("`{k}` is not a valid field name inside a value"));
                        }
                        Ok((k.clone(), ValueExpr::compile(v)?))
                    })
                    .collect::<Result<_, _>>()?,
            ),
        })
    }

    /// Evaluates against an event; a missing path is an error naming the path.
    pub fn eval(&self, event: &Document) -> Result<Bson, String> {
        Ok(match self {
            ValueExpr::Literal(b) => b.clone(),
            ValueExpr::Path(p) => p
                .get(event)
                .cloned()
                .ok_or_else(|| format!("`${}` is missing in the event", p.text))?,
            ValueExpr::Doc(fields) => {
                let mut d = Document::new();
                for (k, v) in fields {
                    d.insert(k.clone(), v.eval(event)?);
                }
                Bson::Document(d)
            }
            ValueExpr::Array(items) => Bson::Array(
                items
                    .iter()
                    .map(|v| v.eval(event))
                    .collect::<Result<_, _>>()?,
            ),
        })
    }
}

/// A dotted path to a field of the read-model document, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath {
    /// The path as written.
    pub text: String,
    segments: Vec<String>,
}

impl FieldPath {
    /// Parses `address.city`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let segments: Vec<String> = text.split('.').map(str::to_string).collect();
        if segments.iter().any(|s| s.is_empty() || s.starts_with('$')) {
            return Err(format!(
                "`{text}` is not a field path (dotted names, none empty or starting with `$`)"
            ));
        }
        if RESERVED_FIELDS.contains(&segments[0].as_str()) {
            return Err(format!("`{}` is maintained by ordo itself", segments[0]));
        }
        Ok(Self {
            text: text.to_string(),
            segments,
        })
    }

    /// The current value, if any.
    pub fn get<'a>(&self, doc: &'a Document) -> Option<&'a Bson> {
        let (first, rest) = self.segments.split_first()?;
        let mut cur = doc.get(first)?;
        for s in rest {
            cur = match cur {
                Bson::Document(d) => d.get(s)?,
                _ => return None,
            };
        }
        Some(cur)
    }

    /// The parent document of the field, created on the way when absent. Fails when a parent
    /// exists and is not a document.
    fn parent_mut<'a>(&self, doc: &'a mut Document) -> Result<&'a mut Document, String> {
        let mut cur = doc;
        for (i, s) in self.segments[..self.segments.len() - 1].iter().enumerate() {
            let entry = cur
                .entry(s.clone())
                .or_insert_with(|| Bson::Document(Document::new()));
            cur = match entry {
                Bson::Document(d) => d,
                other => {
                    return Err(format!(
                        "`{}` is a {:?}, not a document",
                        self.segments[..=i].join("."),
                        other.element_type()
                    ))
                }
            };
        }
        Ok(cur)
    }

    fn leaf(&self) -> &str {
        self.segments.last().expect("a field path has a segment")
    }

    /// Sets the field, creating parents.
    pub fn set(&self, doc: &mut Document, value: Bson) -> Result<(), String> {
        let leaf = self.leaf().to_string();
        self.parent_mut(doc)?.insert(leaf, value);
        Ok(())
    }

    /// The field for in-place edits, inserting `default` when absent.
    pub fn entry<'a>(&self, doc: &'a mut Document, default: Bson) -> Result<&'a mut Bson, String> {
        let leaf = self.leaf().to_string();
        Ok(self.parent_mut(doc)?.entry(leaf).or_insert(default))
    }

    /// Removes the field if present; never creates parents.
    pub fn remove(&self, doc: &mut Document) {
        let mut cur = doc;
        for s in &self.segments[..self.segments.len() - 1] {
            cur = match cur.get_mut(s) {
                Some(Bson::Document(d)) => d,
                _ => return,
            };
        }
        cur.remove(self.leaf());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::doc;

    #[test]
    fn paths_read_the_event_and_literals_pass_through() {
        let event = doc! { "eventId": 3_i64, "payload": { "a": { "b": 7 }, "n": null } };
        let v = ValueExpr::compile(&toml::Value::String("$payload.a.b".into())).unwrap();
        assert_eq!(v.eval(&event).unwrap(), Bson::Int32(7));
        let v = ValueExpr::compile(&toml::Value::String("$$5".into())).unwrap();
        assert_eq!(v.eval(&event).unwrap(), Bson::String("$5".into()));
        let v = ValueExpr::compile(&toml::Value::String("$payload.n".into())).unwrap();
        assert!(v.eval(&event).unwrap_err().contains("$payload.n"));
    }

    #[test]
    fn bad_paths_are_refused_at_compile_time() {
        for bad in ["$", "$payload..x", "$body.x", "$eventId.x"] {
            assert!(
                ValueExpr::compile(&toml::Value::String(bad.into())).is_err(),
                "{bad}"
            );
        }
        assert!(FieldPath::parse("lastEventId").is_err());
        // The rebuild epoch is the engine's too: a rule that wrote it would pass the guard of
        // a rebuilt document for one a worker read before the swap.
        let epoch = FieldPath::parse("_epoch.n").unwrap_err();
        assert!(
            epoch.contains("`_epoch` is maintained by ordo itself"),
            "{epoch}"
        );
        assert!(FieldPath::parse("a..b").is_err());
        assert!(FieldPath::parse("$set").is_err());
    }

    #[test]
    fn field_paths_create_and_remove_nested_fields() {
        let mut d = Document::new();
        let p = FieldPath::parse("address.city").unwrap();
        p.set(&mut d, Bson::String("Oslo".into())).unwrap();
        assert_eq!(d, doc! { "address": { "city": "Oslo" } });
        p.remove(&mut d);
        assert_eq!(d, doc! { "address": {} });
        let mut d = doc! { "address": 1 };
        assert!(p.set(&mut d, Bson::Null).is_err());
    }
}
