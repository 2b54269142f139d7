//! Sending a batch concurrently, within each endpoint's cap.
//!
//! `concurrency` threads take jobs in order, skipping an endpoint that has
//! max_in_flight requests out already (n8n, for one, only queues what it
//! cannot serve). Jobs of one endpoint leave in the order they came. When
//! `stop` turns true (SIGTERM), threads start nothing new: the jobs not yet
//! started come back untouched, for the caller to release.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex};

use super::{Attempt, Job};

struct Board {
    waiting: Vec<(String, VecDeque<Job>)>,
    in_flight: HashMap<String, usize>,
    next: usize,
    attempts: Vec<Attempt>,
}

impl Board {
    /// The next job whose endpoint has room, taking endpoints in turn.
    fn take(&mut self) -> Option<Job> {
        let count = self.waiting.len();
        for step in 0..count {
            let index = (self.next + step) % count;
            let (key, jobs) = &mut self.waiting[index];
            let Some(front) = jobs.front() else { continue };
            let busy = self.in_flight.entry(key.clone()).or_default();
            if *busy < front.endpoint.max_in_flight {
                *busy += 1;
                self.next = (index + 1) % count;
                return jobs.pop_front();
            }
        }
        None
    }

    fn waiting_jobs(&mut self) -> Vec<Job> {
        self.waiting
            .iter_mut()
            .flat_map(|(_, jobs)| jobs.drain(..))
            .collect()
    }
}

/// Sends every job with `send`; returns the attempts made and the jobs left
/// unsent because `stop` said so.
pub fn dispatch<S, T>(
    jobs: Vec<Job>,
    concurrency: usize,
    send: S,
    stop: T,
) -> (Vec<Attempt>, Vec<Job>)
where
    S: Fn(&Job) -> Attempt + Sync,
    T: Fn() -> bool + Sync,
{
    let total = jobs.len();
    let mut waiting: Vec<(String, VecDeque<Job>)> = Vec::new();
    for job in jobs {
        let key = &job.endpoint.event_type;
        match waiting.iter_mut().find(|(k, _)| k == key) {
            Some((_, queue)) => queue.push_back(job),
            None => waiting.push((key.clone(), VecDeque::from([job]))),
        }
    }
    let board = Mutex::new(Board {
        waiting,
        in_flight: HashMap::new(),
        next: 0,
        attempts: Vec::with_capacity(total),
    });
    let changed = Condvar::new();

    let threads = concurrency.clamp(1, total.max(1));
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let job = {
                    let mut state = board.lock().unwrap();
                    loop {
                        if stop() {
                            break None;
                        }
                        if let Some(job) = state.take() {
                            break Some(job);
                        }
                        if state.waiting.iter().all(|(_, jobs)| jobs.is_empty()) {
                            break None;
                        }
                        // Jobs wait, but their endpoints are full: wait for a finish.
                        state = changed.wait(state).unwrap();
                    }
                };
                let Some(job) = job else {
                    changed.notify_all();
                    return;
                };
                let attempt = send(&job);
                let mut state = board.lock().unwrap();
                *state.in_flight.get_mut(&job.endpoint.event_type).unwrap() -= 1;
                state.attempts.push(attempt);
                drop(state);
                changed.notify_all();
            });
        }
    });
    let mut board = board.into_inner().unwrap();
    let unsent = board.waiting_jobs();
    (board.attempts, unsent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::{Endpoint, Verdict};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    fn endpoint(name: &str, cap: usize) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            event_type: name.into(),
            url: format!("http://127.0.0.1/{name}"),
            method: "POST".into(),
            headers: vec![],
            signing_key: None,
            timeout: Duration::from_secs(1),
            max_in_flight: cap,
        })
    }

    fn jobs(endpoint: &Arc<Endpoint>, ids: std::ops::Range<i64>) -> Vec<Job> {
        ids.map(|id| Job {
            event_id: id,
            attempt: 1,
            endpoint: endpoint.clone(),
            body: "{}".into(),
        })
        .collect()
    }

    #[test]
    fn every_job_once_within_each_cap() {
        let slow = endpoint("slow", 2);
        let fast = endpoint("fast", 100);
        let mut all = jobs(&slow, 0..20);
        all.extend(jobs(&fast, 100..180));
        let in_flight: HashMap<&str, AtomicUsize> =
            [("slow", AtomicUsize::new(0)), ("fast", AtomicUsize::new(0))]
                .into_iter()
                .collect();
        let peak: HashMap<&str, AtomicUsize> =
            [("slow", AtomicUsize::new(0)), ("fast", AtomicUsize::new(0))]
                .into_iter()
                .collect();

        let (attempts, unsent) = dispatch(
            all,
            8,
            |job| {
                let name = job.endpoint.event_type.as_str();
                let now = in_flight[name].fetch_add(1, Ordering::SeqCst) + 1;
                peak[name].fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
                in_flight[name].fetch_sub(1, Ordering::SeqCst);
                Attempt {
                    verdict: Verdict::Delivered,
                    ..Attempt::new(job)
                }
            },
            || false,
        );
        assert!(unsent.is_empty());
        let mut ids: Vec<i64> = attempts.iter().map(|a| a.event_id).collect();
        ids.sort();
        let expected: Vec<i64> = (0..20).chain(100..180).collect();
        assert_eq!(ids, expected, "each job sent exactly once");
        assert!(
            peak["slow"].load(Ordering::SeqCst) <= 2,
            "cap of 2 respected"
        );
        assert!(
            peak["fast"].load(Ordering::SeqCst) > 2,
            "other endpoints are not held back"
        );
    }

    #[test]
    fn one_endpoint_keeps_its_order_with_one_slot() {
        let only = endpoint("only", 1);
        let (attempts, _) = dispatch(jobs(&only, 0..30), 4, Attempt::new, || false);
        let ids: Vec<i64> = attempts.iter().map(|a| a.event_id).collect();
        assert_eq!(ids, (0..30).collect::<Vec<_>>());
    }

    #[test]
    fn stop_returns_the_jobs_not_started() {
        let only = endpoint("only", 1);
        let stopping = AtomicBool::new(false);
        let (attempts, unsent) = dispatch(
            jobs(&only, 0..10),
            2,
            |job| {
                if job.event_id == 2 {
                    stopping.store(true, Ordering::SeqCst);
                }
                Attempt::new(job)
            },
            || stopping.load(Ordering::SeqCst),
        );
        assert_eq!(attempts.len(), 3);
        assert_eq!(
            unsent.iter().map(|j| j.event_id).collect::<Vec<_>>(),
            (3..10).collect::<Vec<_>>()
        );
    }

    #[test]
    fn empty_batch() {
        let (attempts, unsent) = dispatch(vec![], 4, Attempt::new, || false);
        assert!(attempts.is_empty() && unsent.is_empty());
    }
}
