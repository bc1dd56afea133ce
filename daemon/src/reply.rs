//! An answer-once guard: where a request's answer goes.
//!
//! Shared by the inference batchers (`infer::Reply`) and the DAG scheduler
//! (`sched::DagReply`). A reply is answered exactly once: dropped unanswered
//! (the thread that held it died or threw it away) it answers with its
//! result type's "dropped" value, so no client ever waits forever.

/// The answer a reply gives when it is dropped unanswered.
pub trait Unanswered {
    fn unanswered() -> Self;
}

/// Where one request's answer goes.
pub struct Reply<T: Unanswered>(Option<Box<dyn FnOnce(T) + Send>>);

impl<T: Unanswered> Reply<T> {
    pub fn new(f: impl FnOnce(T) + Send + 'static) -> Self {
        Self(Some(Box::new(f)))
    }

    /// Drops the reply without answering (the caller answers another way).
    pub fn disarm(mut self) {
        self.0.take();
    }

    pub fn send(mut self, r: T) {
        if let Some(f) = self.0.take() {
            f(r);
        }
    }
}

impl<T: Unanswered> Drop for Reply<T> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f(T::unanswered());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[derive(Debug, PartialEq)]
    enum R {
        Done(u8),
        Dropped,
    }
    impl Unanswered for R {
        fn unanswered() -> Self {
            R::Dropped
        }
    }

    #[test]
    fn answers_once_and_a_dropped_reply_still_answers() {
        let (tx, rx) = mpsc::channel();
        let t = tx.clone();
        Reply::new(move |r| t.send(r).unwrap()).send(R::Done(1));
        let t = tx.clone();
        drop(Reply::<R>::new(move |r| t.send(r).unwrap()));
        Reply::<R>::new(move |r| tx.send(r).unwrap()).disarm();
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![R::Done(1), R::Dropped]);
    }
}
