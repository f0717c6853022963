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

    /// Gives the lease up (on shutdown) so another replica takes over at once.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let ours = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            == Some(self.identity.as_str());
        if !ours {
            return;
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
        }
        if let Err(e) = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            tracing::warn!(lease = %self.name, error = %e, "could not release the controller Lease; it expires on its own");
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
                _ = &mut shutdown => {
                    self.release().await;
                    return;
                }
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
    use crate::operator::mock::{self, status_error, Expect};
    use http::Method;
    use serde_json::json;

    const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/builds/leases/ctl";

    fn lock(client: kube::Client) -> LeaseLock {
        LeaseLock::new(
            Api::namespaced(client, "builds"),
            "ctl",
            "me",
            Duration::from_secs(15),
        )
    }

    #[tokio::test]
    async fn acquire_creates_takes_over_an_expired_lease_and_yields_to_a_live_one() {
        let (client, handle) = mock::client();
        let live = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "ctl", "namespace": "builds", "resourceVersion": "7"},
            "spec": {"holderIdentity": "other", "leaseDurationSeconds": 15, "renewTime": Timestamp::now().to_string()}});
        let expired = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "ctl", "namespace": "builds", "resourceVersion": "8"},
            "spec": {"holderIdentity": "other", "leaseDurationSeconds": 15, "renewTime": "2020-01-01T00:00:00.000000Z", "leaseTransitions": 3}});
        let scenario = vec![
            Expect::new(Method::GET, LEASE, 404, Some(status_error(404, "NotFound"))),
            Expect::new(
                Method::POST,
                "/apis/coordination.k8s.io/v1/namespaces/builds/leases",
                201,
                None,
            )
            .check(|b| assert_eq!(b["spec"]["holderIdentity"], "me")),
            Expect::new(Method::GET, LEASE, 200, Some(live)),
            Expect::new(Method::GET, LEASE, 200, Some(expired)),
            Expect::new(Method::PUT, LEASE, 200, None).check(|b| {
                assert_eq!(b["spec"]["holderIdentity"], "me");
                assert_eq!(b["spec"]["leaseTransitions"], 4);
                assert_eq!(
                    b["metadata"]["resourceVersion"], "8",
                    "optimistic concurrency"
                );
            }),
        ];
        let verifier = mock::verify(handle, scenario);
        let l = lock(client);
        let created = l.try_acquire().await.ok();
        let blocked = l.try_acquire().await.ok();
        let taken = l.try_acquire().await.ok();
        drop(l);
        verifier
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        assert_eq!(
            (created, blocked, taken),
            (Some(true), Some(false), Some(true))
        );
    }

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
