//! Status callbacks in Kubernetes mode, off the reconcile path: the reconciler records a
//! callback as in flight (who, since when) in the BuildJob status, then `spawn`s its
//! delivery here. The task retries within CALLBACK_RETRY_SECONDS, then records the callback
//! as sent (delivered, or given up with a Warning event) with an optimistic status write.
//! A slow receiver holds up nothing but its own task.

use super::controller::{
    callback_auth, fetch_secret, lock, owned_secret, publish, write_status, Context, SECRET_WAIT,
};
use super::crd::{BuildJob, Phase};
use super::decide::{CallbackKind, EventNote};
use crate::secret::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use std::sync::Arc;
use std::time::Duration;

/// The legacy status word of a callback.
pub fn status_word(kind: CallbackKind) -> &'static str {
    match kind {
        CallbackKind::Pending => "pending",
        CallbackKind::Final(s) => s,
    }
}

/// The callback's Authorization (from the BuildJob's credentials Secret).
pub enum Auth {
    /// The reconcile read the Secret already.
    Known(Option<Secret>),
    /// The sender reads it; `wait`: a young BuildJob's Secret may not exist yet (the facade
    /// creates it just after the BuildJob), so wait for it up to SECRET_WAIT after the
    /// BuildJob was created.
    Read { wait: bool },
}

/// Starts delivering `kind` for `job` (as the reconcile wrote it, the callback recorded in
/// flight) unless this process already is.
pub fn spawn(ctx: Arc<Context>, job: &BuildJob, auth: Auth, kind: CallbackKind) {
    let uid = job.uid().unwrap_or_default();
    let name = job.name_any();
    if !lock(&ctx.sending).insert(uid.clone()) {
        // `callback_plan` waits while a sender runs, so this is not expected.
        tracing::warn!(job = %name, "a sender for this BuildJob is still running; the callback recorded in flight waits for a takeover");
        return;
    }
    let url = job.spec.callback.clone().filter(|u| !u.is_empty());
    let build_number = job.spec.build_number;
    let job = job.clone();
    tokio::spawn(async move {
        let word = status_word(kind);
        if let Some(url) = url {
            let auth = match auth {
                Auth::Known(a) => a,
                Auth::Read { wait } => credentials(&ctx, &job, wait).await,
            };
            if let Err(e) = ctx
                .callbacks
                .deliver(&url, auth.as_ref(), build_number, word)
                .await
            {
                tracing::warn!(job = %name, error = %e, "callback not delivered");
                ctx.observer.callback_failed();
                let note = EventNote {
                    warning: true,
                    reason: "CallbackFailed".into(),
                    note: format!("the {word} callback was not delivered: {e}"),
                };
                publish(&ctx, &job.object_ref(&()), &note).await;
            }
        }
        record(&ctx, &job, kind).await;
        lock(&ctx.sending).remove(&uid);
    });
}

/// Marks the callback sent on `written` (the BuildJob as the reconcile wrote it), retrying
/// on conflicts (other writers) and API errors.
async fn record(ctx: &Context, written: &BuildJob, kind: CallbackKind) {
    let (name, ns, uid) = (
        written.name_any(),
        written.namespace().unwrap_or_default(),
        written.uid().unwrap_or_default(),
    );
    let (name, ns, uid) = (name.as_str(), ns.as_str(), uid.as_str());
    let jobs: Api<BuildJob> = Api::namespaced(ctx.client.clone(), ns);
    let mut delay = Duration::from_millis(100);
    // A copy that is exactly our last write serves (as in the reconcile): the one the
    // reconcile wrote, or the cache's. After a conflict, someone else wrote since: read.
    let mut conflict = false;
    for _ in 0..30 {
        let ours = if conflict {
            None
        } else if ctx.is_our_last_write(written) {
            Some(written.clone())
        } else {
            ctx.store
                .get(&ObjectRef::new(name).within(ns))
                .filter(|j| ctx.is_our_last_write(j))
                .map(|j| BuildJob::clone(&j))
        };
        let read = match ours {
            Some(j) => Ok(Some(j)),
            None => jobs.get_opt(name).await,
        };
        match read {
            Ok(Some(job)) if job.uid().as_deref() == Some(uid) => {
                let mut st = job.status.clone().unwrap_or_default();
                match kind {
                    CallbackKind::Pending => st.callbacks.pending = true,
                    CallbackKind::Final(_) => {
                        st.callbacks.final_ = true;
                        let created = job.creation_timestamp().map(|t| t.0);
                        if let Some(c) = created {
                            st.timings_mut().final_callback_ms =
                                u64::try_from(Timestamp::now().duration_since(c).as_millis()).ok();
                        }
                    }
                }
                let ours = st
                    .callbacks
                    .in_flight
                    .as_ref()
                    .is_some_and(|f| f.by == ctx.identity && f.status == status_word(kind));
                if ours {
                    st.callbacks.in_flight = None;
                }
                match write_status(ctx, &jobs, &job, &st).await {
                    Ok(_) => {
                        if matches!(kind, CallbackKind::Final(_))
                            && st.phase.is_some_and(Phase::is_finished)
                        {
                            tracing::info!(job = %name, "final callback sent");
                        }
                        return;
                    }
                    Err(super::controller::Error::Stale) => {
                        conflict = true;
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(job = %name, error = %e, "cannot record a sent callback yet")
                    }
                }
            }
            // Gone, or replaced by a new BuildJob of the same name: nothing to record.
            Ok(_) => return,
            Err(e) => tracing::warn!(job = %name, error = %e, "cannot record a sent callback yet"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
    tracing::error!(job = %name, "gave up recording a sent callback; the next leader may send it again");
}

/// The callback Authorization from the BuildJob's own credentials Secret. Waits for a
/// missing Secret while `wait` and the BuildJob is young; an API error is retried within
/// the callback budget. Without it the callback goes out without Authorization (warned).
async fn credentials(ctx: &Context, job: &BuildJob, wait: bool) -> Option<Secret> {
    let (name, ns) = (job.name_any(), job.namespace().unwrap_or_default());
    let created = job.creation_timestamp().map(|t| t.0);
    let give_up = tokio::time::Instant::now() + ctx.callback_budget;
    let mut delay = Duration::from_millis(500);
    loop {
        match fetch_secret(&ctx.client, &ns, &name).await {
            Ok(secret) => {
                if let Some(s) = owned_secret(secret, job) {
                    let auth = callback_auth(Some(&s));
                    ctx.credentials_read(job, auth.clone());
                    return auth;
                }
                let age =
                    created.map_or(i64::MAX, |c| Timestamp::now().duration_since(c).as_secs());
                if !wait || age >= SECRET_WAIT.as_secs() as i64 {
                    tracing::warn!(job = %name, "the credentials Secret is missing (or not owned by this BuildJob); the callback goes without Authorization");
                    return None;
                }
                tracing::debug!(job = %name, "waiting for the credentials Secret");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) if tokio::time::Instant::now() < give_up => {
                tracing::warn!(job = %name, error = %e, "cannot read the credentials Secret yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                tracing::warn!(job = %name, error = %e, "cannot read the credentials Secret; the callback goes without Authorization");
                return None;
            }
        }
    }
}
