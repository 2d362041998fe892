//! The projections a projector applies: the declarative ones of `projections_file` and those
//! written in Rust, loaded and checked as one set before anything runs.

use std::sync::Arc;

use ordo_projection::{Projection, ProjectionsFile};

use crate::error::{ProjectionConflict, ProjectorError};
use crate::rebuild::SHADOW_MARK;
use crate::ProjectorConfig;

/// Loads and checks the declarative projections named by the configuration.
pub fn load_projections(cfg: &ProjectorConfig) -> Result<Vec<Arc<dyn Projection>>, ProjectorError> {
    load_projections_with(cfg, Vec::new())
}

/// The declarative projections of `projections_file` followed by `custom` ones written in
/// Rust, checked as one set: at least one projection, names and collections unique, none on
/// the events collection or ordo's own. With custom projections the file may define none.
pub fn load_projections_with(
    cfg: &ProjectorConfig,
    custom: Vec<Arc<dyn Projection>>,
) -> Result<Vec<Arc<dyn Projection>>, ProjectorError> {
    let path = &cfg.projector.projections_file;
    let text = std::fs::read_to_string(path).map_err(|source| {
        ProjectorError::ProjectionsFileUnreadable {
            path: path.clone(),
            source,
        }
    })?;
    let compiled = ProjectionsFile::load_str(&text).map_err(|source| {
        ProjectorError::ProjectionsFileInvalid {
            path: path.clone(),
            source,
        }
    })?;
    if compiled.is_empty() && custom.is_empty() {
        return Err(ProjectorError::NoProjections { path: path.clone() });
    }
    let projections: Vec<Arc<dyn Projection>> = compiled
        .into_iter()
        .map(|p| Arc::new(p) as Arc<dyn Projection>)
        .chain(custom)
        .collect();
    check_projections(
        &projections,
        &cfg.mongodb.events_collection,
        &cfg.projector.blocked_collection,
    )
    .map_err(|source| ProjectorError::ProjectionConflict {
        path: path.clone(),
        source,
    })?;
    Ok(projections)
}

/// Prefix of ordo's own collections, which no projection may own.
pub const ORDO_PREFIX: &str = "ordo_";

/// Why a projection may not own `collection`, if it may not: the events collection (a rebuild
/// would drop the source of truth), ordo's own collections, and shadow names.
pub fn forbidden_target(
    collection: &str,
    events_collection: &str,
    blocked_collection: &str,
) -> Option<String> {
    if collection == events_collection {
        Some("is the events collection (mongodb.events_collection)".into())
    } else if collection.starts_with(ORDO_PREFIX) || collection == blocked_collection {
        Some("is one of ordo's own collections".into())
    } else if collection.contains(SHADOW_MARK) {
        Some(format!(
            "contains {SHADOW_MARK:?}, which marks rebuild shadows"
        ))
    } else if collection.starts_with("system.") {
        Some("is a system collection".into())
    } else {
        None
    }
}

/// Checks every projection's collection at config load.
pub fn check_projections(
    projections: &[Arc<dyn Projection>],
    events_collection: &str,
    blocked_collection: &str,
) -> Result<(), ProjectionConflict> {
    let mut names = std::collections::BTreeSet::new();
    let mut collections = std::collections::BTreeSet::new();
    for p in projections {
        let (projection, collection) = (p.name().to_string(), p.collection().to_string());
        if !names.insert(p.name()) {
            return Err(ProjectionConflict::SameName { name: projection });
        }
        if !collections.insert(p.collection()) {
            return Err(ProjectionConflict::SameCollection {
                projection,
                collection,
            });
        }
        if let Some(why) = forbidden_target(p.collection(), events_collection, blocked_collection) {
            return Err(ProjectionConflict::ForbiddenCollection {
                projection,
                collection,
                why,
            });
        }
    }
    Ok(())
}
