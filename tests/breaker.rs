//! The circuit breaker against receivers that misbehave on purpose, for
//! both deliverers: the extension's worker and pipeline-relay (a
//! trigger-only install). The scenarios are in tests/support/faults.rs.

mod support;

use support::behaviours::Kind;
use support::faults;

#[test]
fn worker_first_attempts_failing_settle_at_their_backoff() {
    faults::first_attempts_failing_settle_at_their_backoff(Kind::Worker);
}

#[test]
fn relay_first_attempts_failing_settle_at_their_backoff() {
    faults::first_attempts_failing_settle_at_their_backoff(Kind::Relay);
}

#[test]
fn worker_a_poison_event_costs_its_neighbours_nothing() {
    faults::a_poison_event_costs_its_neighbours_nothing(Kind::Worker);
}

#[test]
fn relay_a_poison_event_costs_its_neighbours_nothing() {
    faults::a_poison_event_costs_its_neighbours_nothing(Kind::Relay);
}

#[test]
fn worker_a_dead_endpoint_is_probed_then_served_within_seconds() {
    faults::a_dead_endpoint_is_probed_then_served_within_seconds(Kind::Worker);
}

#[test]
fn relay_a_dead_endpoint_is_probed_then_served_within_seconds() {
    faults::a_dead_endpoint_is_probed_then_served_within_seconds(Kind::Relay);
}

#[test]
fn worker_retry_after_paces_the_endpoint() {
    faults::retry_after_paces_the_endpoint(Kind::Worker);
}

#[test]
fn relay_retry_after_paces_the_endpoint() {
    faults::retry_after_paces_the_endpoint(Kind::Relay);
}

#[test]
fn worker_gone_means_no_new_request() {
    faults::gone_means_no_new_request(Kind::Worker);
}

#[test]
fn relay_gone_means_no_new_request() {
    faults::gone_means_no_new_request(Kind::Relay);
}

#[test]
fn worker_a_dead_endpoint_is_given_up_and_says_so_before() {
    faults::a_dead_endpoint_is_given_up_and_says_so_before(Kind::Worker);
}

#[test]
fn relay_a_dead_endpoint_is_given_up_and_says_so_before() {
    faults::a_dead_endpoint_is_given_up_and_says_so_before(Kind::Relay);
}

#[test]
fn worker_events_of_a_dead_endpoint_end_on_their_own_schedule() {
    faults::events_of_a_dead_endpoint_end_on_their_own_schedule(Kind::Worker);
}

#[test]
fn relay_events_of_a_dead_endpoint_end_on_their_own_schedule() {
    faults::events_of_a_dead_endpoint_end_on_their_own_schedule(Kind::Relay);
}

#[test]
fn worker_mixed_answers_settle_every_event() {
    faults::mixed_answers_settle_every_event(Kind::Worker);
}

#[test]
fn relay_mixed_answers_settle_every_event() {
    faults::mixed_answers_settle_every_event(Kind::Relay);
}

#[test]
fn worker_a_changed_endpoint_gets_nothing_claimed_before() {
    faults::a_changed_endpoint_gets_nothing_claimed_before(Kind::Worker);
}

#[test]
fn relay_a_changed_endpoint_gets_nothing_claimed_before() {
    faults::a_changed_endpoint_gets_nothing_claimed_before(Kind::Relay);
}
