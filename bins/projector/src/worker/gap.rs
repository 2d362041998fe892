//! Gap filling: a fold that meets a gap (a version missing between the model and the batch)
//! reads the missing versions from the events collection, waiting up to `gap_timeout` for
//! events still in flight, applies them and folds on; what cannot be had becomes the stop
//! where the aggregate is blocked.

use super::apply::{projection_error, stop_at};
use super::{Engine, Event};
use crate::settle::{Stop, REASON_DUPLICATE, REASON_GAP, REASON_SOURCE};
use crate::store::StoreError;
use mongodb::bson::Document;
use ordo_core::metrics as m;
use ordo_projection::{event_version, fold_events, Gap, Projection, ReadModel};
use std::collections::BTreeMap;

impl Engine {
    /// Folds the events up to `limit` into `model`, filling gaps from the events collection.
    /// Returns where folding must stop, if it must.
    pub(super) async fn fold(
        &self,
        p: &dyn Projection,
        model: &mut ReadModel,
        events: &[&Event],
        limit: i64,
        gap_events: &mut BTreeMap<i64, Document>,
    ) -> Result<Option<Stop>, StoreError> {
        let docs: Vec<&Document> = events
            .iter()
            .filter(|e| e.version <= limit)
            .map(|e| &e.doc)
            .collect();
        loop {
            match fold_events(p, model, docs.iter().copied()) {
                Ok(None) => return Ok(None),
                Ok(Some(gap)) => {
                    if let Some(s) = self.fill_gap(p, model, gap, gap_events).await? {
                        return Ok(Some(s));
                    }
                }
                Err(e) => return Ok(Some(projection_error(p, &model.id, e))),
            }
        }
    }

    /// Applies the missing versions of `gap` to `model`, read from the events collection first
    /// unless an earlier fold of this batch read them. Where folding must stop instead, if it
    /// must: the gap not filled, an invalid or duplicated source event, a projection error.
    async fn fill_gap(
        &self,
        p: &dyn Projection,
        model: &mut ReadModel,
        Gap { from, to }: Gap,
        gap_events: &mut BTreeMap<i64, Document>,
    ) -> Result<Option<Stop>, StoreError> {
        if (from..=to).any(|v| !gap_events.contains_key(&v)) {
            if let Some(s) = self.read_gap(p, &model.id, from, to, gap_events).await? {
                return Ok(Some(s));
            }
        }
        for v in from..=to {
            // The read returned every version of the range, each once.
            let Some(e) = gap_events.get(&v) else {
                let description = format!(
                    "event v{v} of {} was not read while filling the gap",
                    model.id
                );
                return Ok(Some(stop_at(p, v, REASON_GAP, description)));
            };
            if let Err(e) = model.apply(p, e) {
                return Ok(Some(projection_error(p, &model.id, e)));
            }
        }
        Ok(None)
    }

    /// Reads versions `from..=to` of `id` into `gap_events`, waiting up to `gap_timeout` for
    /// them ([`Store::wait_for_events`]). The stop when they cannot be had: not all there in
    /// time, or a source event that breaks the contract; a database fault is an error.
    async fn read_gap(
        &self,
        p: &dyn Projection,
        id: &str,
        from: i64,
        to: i64,
        gap_events: &mut BTreeMap<i64, Document>,
    ) -> Result<Option<Stop>, StoreError> {
        match self
            .store
            .wait_for_events(id, from, to, self.cfg.gap_timeout)
            .await
        {
            Ok(Some(found)) => {
                metrics::counter!(m::GAP_EVENTS_FILLED).increment(found.len() as u64);
                tracing::info!(aggregate = %id, from, to, "gap filled from the events collection");
                for e in found {
                    gap_events.insert(event_version(&e), e);
                }
                Ok(None)
            }
            Ok(None) => {
                let description = format!(
                    "events v{from}..v{to} of {id} not found in the events collection within {:?}",
                    self.cfg.gap_timeout
                );
                Ok(Some(stop_at(p, from, REASON_GAP, description)))
            }
            Err(e @ StoreError::BadEvent { .. }) => {
                Ok(Some(stop_at(p, from, REASON_SOURCE, e.to_string())))
            }
            Err(e @ StoreError::DuplicateVersion { .. }) => {
                Ok(Some(stop_at(p, from, REASON_DUPLICATE, e.to_string())))
            }
            Err(e) => Err(e),
        }
    }
}
