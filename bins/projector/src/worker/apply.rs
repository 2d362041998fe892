//! Applying events: fold them into the aggregate's read models (healing gaps from the events
//! collection) and write each changed model once, guarded by the version it was read at.

use super::*;

impl Engine {
    /// Folds `events` into every relevant projection and writes each changed model once.
    /// A fault of the events (poison, a refused write) becomes the returned stop; any other
    /// fault is an error, and the caller retries the batch.
    pub(super) async fn apply(
        &self,
        held: &mut Held,
        aggregate_id: &str,
        events: &[&Event],
    ) -> Result<Applied, WorkError> {
        if !self.cfg.apply_delay.is_zero() {
            tokio::time::sleep(self.cfg.apply_delay).await;
        }
        // A batch from v1 starts its aggregate (a new order, a new user): its models are not
        // read first but created by the write, an insert whose guard catches a model that
        // exists after all (a redelivery, a rebuild), which is read then. One database round
        // trip less for every new aggregate.
        let new_aggregate = events.first().is_some_and(|e| e.version == 1);
        let mut plan = self.plan(held, aggregate_id, events, new_aggregate).await?;
        if plan.stop.is_some() && !plan.assumed.is_empty() {
            // A stop found on a model assumed new may be none on the stored one: read them.
            for pi in std::mem::take(&mut plan.assumed) {
                held.models[pi] = None;
            }
            plan = self.plan(held, aggregate_id, events, false).await?;
        }
        let Plan {
            mut limit,
            mut base,
            mut stop,
            mut healed,
            ..
        } = plan;
        // Phase 2: fold up to the limit and write, reloading on a failed guard. A model
        // reloaded after a conflict can be older than the one phase 1 folded (a rebuild, an
        // operator's reset) and stop elsewhere: that stop lowers the limit too.
        for (pi, p) in self.projections.iter().enumerate() {
            let mut conflicts = 0;
            loop {
                let Some((stored, loaded)) = held.models[pi].clone() else {
                    break;
                };
                let mut model = stored.clone();
                if let Some(s) = self
                    .fold(p.as_ref(), &mut model, events, limit, &mut healed)
                    .await?
                {
                    lower(&mut limit, &mut stop, s);
                }
                if !model.needs_write(loaded) {
                    held.models[pi] = Some((model, loaded));
                    break;
                }
                match self.store.write(p.as_ref(), &model, loaded).await {
                    Ok(Written::Ok) => {
                        let v = model.version;
                        held.models[pi] = Some((model, v));
                        break;
                    }
                    Ok(Written::Conflict) => {
                        metrics::counter!(m::GUARD_CONFLICTS).increment(1);
                        conflicts += 1;
                        if conflicts > self.cfg.transient_retry_limit.max(3) {
                            return Err(WorkError::ConflictStorm(conflicts));
                        }
                        let fresh = self.store.load(p.as_ref(), aggregate_id).await?;
                        let v = fresh.version;
                        base = base.max(v);
                        held.models[pi] = Some((fresh, v));
                    }
                    Err(e) if e.is_refusal() => {
                        tracing::error!(aggregate = %aggregate_id, projection = p.name(), error = %e, "the server refused the read model");
                        lower(
                            &mut limit,
                            &mut stop,
                            Stop {
                                version: loaded + 1,
                                fault: Fault {
                                    reason: REASON_REFUSED,
                                    description: format!(
                                        "{} of {aggregate_id} up to v{}: {e}",
                                        p.collection(),
                                        model.version
                                    ),
                                    projection: p.name().to_string(),
                                },
                            },
                        );
                        break;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(Applied {
            durable: limit,
            base,
            stop,
        })
    }

    /// Loads the models the batch needs (`assume_new`: takes them as empty instead, and lists
    /// them in [`Plan::assumed`]) and finds where folding must stop (poison, unhealed gap),
    /// without writing.
    async fn plan(
        &self,
        held: &mut Held,
        aggregate_id: &str,
        events: &[&Event],
        assume_new: bool,
    ) -> Result<Plan, WorkError> {
        let mut plan = Plan {
            limit: 0,
            base: 0,
            stop: None,
            healed: BTreeMap::new(),
            assumed: Vec::new(),
        };
        // With no event to apply (the batch starts with a message that cannot be read), every
        // model: what they hold is where that message stands.
        for (pi, p) in self.projections.iter().enumerate() {
            let needed = events.is_empty() || events.iter().any(|e| selects(p.as_ref(), &e.doc));
            if held.models[pi].is_none() && needed {
                let model = if assume_new {
                    plan.assumed.push(pi);
                    ReadModel::empty(aggregate_id)
                } else {
                    self.store.load(p.as_ref(), aggregate_id).await?
                };
                let v = model.version;
                held.models[pi] = Some((model, v));
            }
            if let Some((m, _)) = &held.models[pi] {
                plan.base = plan.base.max(m.version);
            }
        }
        // Durable after this batch, unless a stop lowers it: its last event, or what the models
        // already held when that is more (a batch of duplicates).
        plan.limit = events.iter().map(|e| e.version).fold(plan.base, i64::max);
        for (pi, p) in self.projections.iter().enumerate() {
            let Some((model, _)) = &held.models[pi] else {
                continue;
            };
            let mut model = model.clone();
            if let Some(s) = self
                .fold(p.as_ref(), &mut model, events, plan.limit, &mut plan.healed)
                .await?
            {
                lower(&mut plan.limit, &mut plan.stop, s);
            }
        }
        Ok(plan)
    }

    /// Folds the events up to `limit` into `model`, healing gaps from the events collection.
    /// Returns where folding must stop, if it must.
    pub(super) async fn fold(
        &self,
        p: &dyn Projection,
        model: &mut ReadModel,
        events: &[&Event],
        limit: i64,
        healed: &mut BTreeMap<i64, Document>,
    ) -> Result<Option<Stop>, StoreError> {
        let docs: Vec<&Document> = events
            .iter()
            .filter(|e| e.version <= limit)
            .map(|e| &e.doc)
            .collect();
        let stop = |version: i64, reason: &'static str, description: String| {
            Some(Stop {
                version,
                fault: Fault {
                    reason,
                    description,
                    projection: p.name().to_string(),
                },
            })
        };
        loop {
            let err = match fold_events(p, model, docs.iter().copied()) {
                Ok(Some(Gap { from, to })) => {
                    if (from..=to).any(|v| !healed.contains_key(&v)) {
                        match self
                            .store
                            .heal(&model.id, from, to, self.cfg.gap_timeout)
                            .await
                        {
                            Ok(Some(found)) => {
                                metrics::counter!(m::GAPS_HEALED).increment(found.len() as u64);
                                tracing::info!(aggregate = %model.id, from, to, "gap healed from the events collection");
                                for e in found {
                                    healed.insert(event_version(&e), e);
                                }
                            }
                            Ok(None) => {
                                return Ok(stop(
                                    from,
                                    REASON_GAP,
                                    format!(
                                        "events v{from}..v{to} of {} not found in the events collection within {:?}",
                                        model.id, self.cfg.gap_timeout
                                    ),
                                ))
                            }
                            Err(e @ StoreError::BadEvent { .. }) => {
                                return Ok(stop(from, REASON_SOURCE, e.to_string()))
                            }
                            Err(e @ StoreError::DuplicateVersion { .. }) => {
                                return Ok(stop(from, REASON_DUPLICATE, e.to_string()))
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    let mut failed = None;
                    for v in from..=to {
                        // Healing returned every version of the range, each once.
                        let Some(e) = healed.get(&v) else {
                            return Ok(stop(
                                v,
                                REASON_GAP,
                                format!("event v{v} of {} was not read while healing", model.id),
                            ));
                        };
                        if let Err(e) = model.apply(p, e) {
                            failed = Some(e);
                            break;
                        }
                    }
                    match failed {
                        None => continue,
                        Some(e) => e,
                    }
                }
                Ok(_) => return Ok(None),
                Err(e) => e,
            };
            tracing::error!(aggregate = %model.id, projection = p.name(), event_id = err.event_id, error = %err, "projection error");
            return Ok(stop(err.event_id, REASON_PROJECTION, err.to_string()));
        }
    }
}

/// What [`Engine::plan`] found before anything is written.
struct Plan {
    /// The highest version that can be made durable.
    limit: i64,
    /// The highest version the models held.
    base: i64,
    /// Where folding must stop, if it must.
    stop: Option<Stop>,
    /// Events read from the events collection to fill gaps.
    healed: BTreeMap<i64, Document>,
    /// Projections whose model was taken as empty without reading it.
    assumed: Vec<usize>,
}

/// Lowers `limit` to just below `s`, which becomes the stop, when `s` is at or below it.
fn lower(limit: &mut i64, stop: &mut Option<Stop>, s: Stop) {
    if s.version <= *limit {
        *limit = s.version - 1;
        *stop = Some(s);
    }
}
