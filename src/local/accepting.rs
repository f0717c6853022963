//! `POST /`s of a build whose first `POST /` is still waiting for its journal write: they
//! answer what the first one answers. Answering them `200` at once would acknowledge a
//! build that the first one's failed write then drops (a client retrying on a slow disk).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use uuid::Uuid;

type Answers = Mutex<HashMap<Uuid, watch::Receiver<Option<bool>>>>;

/// The builds being accepted right now, each with the answer its first `POST /` will get.
#[derive(Default)]
pub(super) struct Accepting(Arc<Answers>);

/// The first `POST /` of a build: `done` tells the duplicates, and forgets the build. It
/// owns what it needs, so the rest of an acceptance can run on a task of its own.
pub(super) struct First {
    id: Uuid,
    tx: watch::Sender<Option<bool>>,
    of: Arc<Answers>,
}

fn lock(
    answers: &Answers,
) -> std::sync::MutexGuard<'_, HashMap<Uuid, watch::Receiver<Option<bool>>>> {
    answers
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Accepting {
    /// Marks `id` as being accepted. Call it under the lock that makes the build known, so a
    /// duplicate that finds the build also finds this.
    pub(super) fn begin(&self, id: Uuid) -> First {
        let (tx, rx) = watch::channel(None);
        lock(&self.0).insert(id, rx);
        First {
            id,
            tx,
            of: self.0.clone(),
        }
    }

    /// The first `POST /`'s answer to come, if `id` is being accepted now (else the build
    /// is already on disk).
    pub(super) fn join(&self, id: &Uuid) -> Option<watch::Receiver<Option<bool>>> {
        lock(&self.0).get(id).cloned()
    }
}

impl First {
    /// Whether the build was saved; the duplicates waiting get the same. Call it before the
    /// build's record is dropped on a failure, so a later `POST /` starts afresh.
    pub(super) fn done(self, saved: bool) {
        self.tx.send_replace(Some(saved));
    }
}

impl Drop for First {
    /// Answered or not, the build is no longer being accepted.
    fn drop(&mut self) {
        lock(&self.of).remove(&self.id);
    }
}

/// Waits for the first `POST /`'s answer: whether the build was saved.
pub(super) async fn answer(mut rx: watch::Receiver<Option<bool>>) -> bool {
    match rx.wait_for(Option::is_some).await {
        Ok(v) => v.unwrap_or(false),
        // The first request's task ended without an answer: it did not save the build.
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_duplicate_gets_the_first_posts_answer_and_none_waits_once_it_is_given() {
        let accepting = Accepting::default();
        let id = Uuid::new_v4();
        for saved in [false, true] {
            let first = accepting.begin(id);
            let dup = accepting.join(&id).expect("being accepted");
            let waiting = tokio::spawn(answer(dup));
            tokio::task::yield_now().await;
            assert!(!waiting.is_finished(), "waits for the first");
            first.done(saved);
            assert_eq!(waiting.await.unwrap(), saved);
            assert!(accepting.join(&id).is_none(), "forgotten once answered");
        }
        // A first request dropped without an answer (its task cancelled) saved nothing.
        let first = accepting.begin(id);
        let dup = accepting.join(&id).unwrap();
        drop(first);
        assert!(!answer(dup).await);
        assert!(accepting.join(&id).is_none());
    }
}
