//! Leader election with a `coordination.k8s.io/v1` Lease, written directly: one controller
//! acts at a time; the facade runs in any number of replicas. Optimistic concurrency (the
//! resourceVersion on replace) makes a takeover race have one winner.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::Api;
use std::future::Future;
use std::time::Duration;

pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

/// Whether `identity` may take (or keep) the lease as it stands at `now`.
pub fn may_hold(spec: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> bool {
    let Some(spec) = spec else { return true };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() || holder == identity {
        return true;
    }
    let secs = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    match spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) {
        Some(t) => now.duration_since(t.0).as_secs() >= secs,
        None => true,
    }
}

/// The lease spec after `identity` took or renewed it at `now`.
pub fn taken(
    prev: Option<&LeaseSpec>,
    identity: &str,
    duration: Duration,
    now: Timestamp,
) -> LeaseSpec {
    let ours = prev.and_then(|p| p.holder_identity.as_deref()) == Some(identity);
    let transitions = prev.and_then(|p| p.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(identity.to_string()),
        lease_duration_seconds: Some(i32::try_from(duration.as_secs()).unwrap_or(i32::MAX)),
        acquire_time: if ours {
            prev.and_then(|p| p.acquire_time.clone())
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if ours || prev.is_none() {
            transitions
        } else {
            transitions + 1
        }),
        ..Default::default()
    }
}

impl LeaseLock {
    pub fn new(
        api: Api<Lease>,
        name: impl Into<String>,
        identity: impl Into<String>,
        duration: Duration,
    ) -> Self {
        Self {
            api,
            name: name.into(),
            identity: identity.into(),
            duration,
        }
    }

    /// Takes or renews the lease; `Ok(false)` when someone else holds it (or won a race).
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        match self.api.get_opt(&self.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(taken(None, &self.identity, self.duration, now)),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Some(mut lease) => {
                if !may_hold(lease.spec.as_ref(), &self.identity, now) {
                    return Ok(false);
                }
                lease.spec = Some(taken(
                    lease.spec.as_ref(),
                    &self.identity,
                    self.duration,
                    now,
                ));
                match self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.is_conflict() => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Runs `work()` while this process holds the lease: waits to acquire it, renews it every
    /// third of its duration, and drops the work (stopping it) when a renewal fails for
    /// longer than the lease lasts. Returns when `shutdown` resolves.
    pub async fn run_while_leader<F, Fut>(&self, mut work: F, shutdown: impl Future<Output = ()>)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = ()>,
    {
        tokio::pin!(shutdown);
        let tick = self.duration / 3;
        loop {
            // Follower: wait for the lease.
            loop {
                match self.try_acquire().await {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(lease = %self.name, error = %e, "cannot read the controller Lease")
                    }
                }
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep(tick) => {}
                }
            }
            tracing::info!(lease = %self.name, identity = %self.identity, "leading: the controller runs here");
            let renew = async {
                let mut last_ok = tokio::time::Instant::now();
                loop {
                    tokio::time::sleep(tick).await;
                    match self.try_acquire().await {
                        Ok(true) => last_ok = tokio::time::Instant::now(),
                        Ok(false) => return,
                        Err(e) => {
                            tracing::warn!(lease = %self.name, error = %e, "cannot renew the controller Lease");
                            if last_ok.elapsed() >= self.duration {
                                return;
                            }
                        }
                    }
                }
            };
            tokio::select! {
                _ = &mut shutdown => return,
                _ = work() => {
                    tracing::warn!("the controller stopped while leading");
                    return;
                }
                _ = renew => tracing::warn!(lease = %self.name, "lost the controller Lease; standing by"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn a_lease_is_free_when_absent_ours_or_expired() {
        assert!(may_hold(None, "a", at(0)));
        let held = taken(None, "b", Duration::from_secs(15), at(0));
        assert!(!may_hold(Some(&held), "a", at(14)));
        assert!(may_hold(Some(&held), "a", at(15)));
        assert!(may_hold(Some(&held), "b", at(1)));
        let renewed = taken(Some(&held), "b", Duration::from_secs(15), at(10));
        assert_eq!(renewed.acquire_time, held.acquire_time);
        assert_eq!(renewed.lease_transitions, Some(0));
        let stolen = taken(Some(&renewed), "a", Duration::from_secs(15), at(30));
        assert_eq!(stolen.lease_transitions, Some(1));
        assert_eq!(stolen.holder_identity.as_deref(), Some("a"));
    }
}
