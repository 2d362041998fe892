//! Running one compiled operation on a read model; what fails here depends on the event's
//! content (a missing `$payload` field, a non-number for `inc`) and makes the event poison.

use mongodb::bson::{Bson, Document};

use super::{DeclarativeProjection, Op};

#[derive(Clone, Copy)]
pub(super) enum Num {
    Int(i64),
    Float(f64),
}

pub(super) fn as_number(b: &Bson) -> Option<Num> {
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
    pub(super) fn apply_op(
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
