//! Round-engine behaviour, event by event.

use super::*;

fn cfg() -> EngineConfig {
    EngineConfig {
        target: 10,
        over_selection: 1.3,
        min_reports: 8,
        selection_timeout_ms: 1_000,
        report_deadline_ms: 10_000,
        rounds: 3,
        pace_jitter_ms: 500,
        retry_ms: 2_000,
        seed: 7,
        max_participations: None,
        min_separation: 0,
        selection_window_ms: 0,
    }
}

fn check_in_all(
    e: &mut RoundEngine,
    devices: impl IntoIterator<Item = DeviceId>,
    now: u64,
) -> Vec<Action> {
    devices
        .into_iter()
        .flat_map(|d| e.handle(Event::CheckIn { device: d }, now))
        .collect()
}

fn report_all(
    e: &mut RoundEngine,
    devices: impl IntoIterator<Item = DeviceId>,
    round: u64,
    now: u64,
) -> Vec<Action> {
    devices
        .into_iter()
        .flat_map(|device| e.handle(Event::Report { device, round }, now))
        .collect()
}

fn plans(actions: &[Action]) -> Vec<DeviceId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SendPlan { device, .. } => Some(*device),
            _ => None,
        })
        .collect()
}

#[test]
fn over_selects_then_steers_the_rest_away() {
    let mut e = RoundEngine::new(cfg(), 0).unwrap();
    let actions = check_in_all(&mut e, 0..20, 10);
    assert_eq!(
        plans(&actions),
        (0..13).collect::<Vec<_>>(),
        "⌈10 × 1.3⌉ = 13 selected"
    );
    assert!(actions.contains(&Action::StartReporting {
        round: 1,
        selected: 13,
        deadline: 10_010
    }));
    let backs: Vec<u64> = actions
        .iter()
        .filter_map(|a| match a {
            Action::ComeBackAt { at, .. } => Some(*at),
            _ => None,
        })
        .collect();
    assert_eq!(backs.len(), 7);
    // Reports are due by 10 010, but the round may close earlier: come back
    // after `retry_ms` (2 000), plus up to 500 ms of jitter.
    assert!(
        backs.iter().all(|&t| (2_010..2_510).contains(&t)),
        "{backs:?}"
    );
    let distinct: BTreeSet<u64> = backs.iter().copied().collect();
    assert!(
        distinct.len() >= 5,
        "pace steering spreads come-back times: {backs:?}"
    );
}

#[test]
fn closes_at_target_and_refuses_stragglers_duplicates_and_strangers() {
    let mut e = RoundEngine::new(cfg(), 0).unwrap();
    check_in_all(&mut e, 0..13, 0);
    let log = report_all(&mut e, 0..9, 1, 100);
    assert!(!log.iter().any(|a| matches!(a, Action::CloseRound { .. })));
    let dup = e.handle(
        Event::Report {
            device: 3,
            round: 1,
        },
        101,
    );
    assert_eq!(
        dup,
        vec![Action::RefuseReport {
            device: 3,
            round: 1,
            reason: Refusal::Duplicate
        }]
    );
    let stranger = e.handle(
        Event::Report {
            device: 99,
            round: 1,
        },
        102,
    );
    assert_eq!(
        stranger[0],
        Action::RefuseReport {
            device: 99,
            round: 1,
            reason: Refusal::NotSelected
        }
    );
    let tenth = e.handle(
        Event::Report {
            device: 9,
            round: 1,
        },
        103,
    );
    assert_eq!(
        tenth,
        vec![
            Action::AcceptReport {
                device: 9,
                round: 1
            },
            Action::CloseRound {
                round: 1,
                reports: 10
            }
        ]
    );
    assert_eq!(e.round(), 2);
    let straggler = e.handle(
        Event::Report {
            device: 11,
            round: 1,
        },
        104,
    );
    assert_eq!(
        straggler[0],
        Action::RefuseReport {
            device: 11,
            round: 1,
            reason: Refusal::NotOpen
        }
    );
}

#[test]
fn deadline_closes_with_quorum_and_abandons_without() {
    let mut e = RoundEngine::new(cfg(), 0).unwrap();
    check_in_all(&mut e, 0..13, 0);
    for d in 0..8 {
        e.handle(
            Event::Report {
                device: d,
                round: 1,
            },
            500,
        );
    }
    assert!(e.handle(Event::Tick, 9_999).is_empty());
    assert_eq!(
        e.handle(Event::Tick, 10_000),
        vec![Action::CloseRound {
            round: 1,
            reports: 8
        }]
    );

    check_in_all(&mut e, 100..113, 10_000);
    for d in 100..107 {
        e.handle(
            Event::Report {
                device: d,
                round: 2,
            },
            11_000,
        );
    }
    let a = e.handle(Event::Tick, 20_000);
    assert!(
        matches!(&a[..], [Action::AbandonRound { round: 2, reason }] if reason.contains("7 reports")),
        "{a:?}"
    );
    assert_eq!(e.round(), 2, "an abandoned round is retried");
    assert_eq!(e.abandoned().get(&2), Some(&1));
    // Reports for the abandoned attempt no longer count.
    let late = e.handle(
        Event::Report {
            device: 100,
            round: 2,
        },
        20_001,
    );
    assert_eq!(
        late[0],
        Action::RefuseReport {
            device: 100,
            round: 2,
            reason: Refusal::NotSelected
        }
    );
}

#[test]
fn selection_timeout_starts_reporting_or_abandons() {
    let mut e = RoundEngine::new(cfg(), 0).unwrap();
    check_in_all(&mut e, 0..9, 0);
    assert_eq!(e.next_deadline(), Some(1_000));
    let a = e.handle(Event::Tick, 1_000);
    assert_eq!(
        a,
        vec![Action::StartReporting {
            round: 1,
            selected: 9,
            deadline: 11_000
        }]
    );

    let mut e = RoundEngine::new(cfg(), 0).unwrap();
    check_in_all(&mut e, 0..3, 0);
    let a = e.handle(Event::Tick, 1_000);
    assert!(
        matches!(&a[..], [Action::AbandonRound { round: 1, .. }]),
        "{a:?}"
    );
}

#[test]
fn dropouts_end_the_round_early() {
    let mut e = RoundEngine::new(cfg(), 0).unwrap();
    check_in_all(&mut e, 0..13, 0);
    for d in 0..9 {
        e.handle(
            Event::Report {
                device: d,
                round: 1,
            },
            10,
        );
    }
    for d in 9..12 {
        assert!(e.handle(Event::DropOut { device: d }, 20).is_empty());
    }
    let a = e.handle(Event::DropOut { device: 12 }, 30);
    assert_eq!(
        a,
        vec![Action::CloseRound {
            round: 1,
            reports: 9
        }],
        "everyone is in or out"
    );
}

#[test]
fn a_device_that_drops_out_and_then_reports_counts_once() {
    let mut e = RoundEngine::new(cfg(), 0).unwrap();
    check_in_all(&mut e, 0..13, 0);
    // Device 0 drops out, reconnects and reports after all: it is a report, not a dropout.
    assert!(e.handle(Event::DropOut { device: 0 }, 5).is_empty());
    let report = |e: &mut RoundEngine, d| {
        e.handle(
            Event::Report {
                device: d,
                round: 1,
            },
            10,
        )
    };
    assert_eq!(
        report(&mut e, 0),
        vec![Action::AcceptReport {
            device: 0,
            round: 1
        }]
    );
    for d in 1..8 {
        report(&mut e, d);
    }
    for d in 8..12 {
        assert!(e.handle(Event::DropOut { device: d }, 20).is_empty());
    }
    // 8 reports and 4 dropouts of 13: device 12 is still out, so the round stays open.
    assert!(e.handle(Event::Tick, 30).is_empty());
    assert_eq!(
        e.handle(Event::DropOut { device: 12 }, 40),
        vec![Action::CloseRound {
            round: 1,
            reports: 8
        }]
    );
}

#[test]
fn finishes_after_the_last_round_and_steers_everyone_away() {
    let mut e = RoundEngine::new(EngineConfig { rounds: 1, ..cfg() }, 0).unwrap();
    check_in_all(&mut e, 0..13, 0);
    let mut last = Vec::new();
    for d in 0..10 {
        last = e.handle(
            Event::Report {
                device: d,
                round: 1,
            },
            10,
        );
    }
    assert_eq!(last.last(), Some(&Action::Finished));
    assert_eq!(e.next_deadline(), None);
    assert!(matches!(
        e.handle(Event::CheckIn { device: 50 }, 20)[..],
        [Action::ComeBackAt { .. }]
    ));
}

#[test]
fn same_events_same_actions() {
    let run = || {
        let mut e = RoundEngine::new(cfg(), 0).unwrap();
        let mut all = check_in_all(&mut e, 0..40, 5);
        all.extend((0..10).flat_map(|d| {
            e.handle(
                Event::Report {
                    device: d,
                    round: 1,
                },
                50,
            )
        }));
        all.extend(check_in_all(&mut e, 40..80, 60));
        all
    };
    assert_eq!(run(), run());
}

#[test]
fn resumes_a_round_with_its_accepted_reports() {
    let mut e = RoundEngine::resume(cfg(), 2, 1, &[], &[4, 5, 6], 1_000).unwrap();
    assert_eq!(e.round(), 2);
    let dup = e.handle(
        Event::Report {
            device: 5,
            round: 2,
        },
        1_001,
    );
    assert_eq!(
        dup[0],
        Action::RefuseReport {
            device: 5,
            round: 2,
            reason: Refusal::Duplicate
        }
    );
    let a = check_in_all(&mut e, 10..30, 1_002);
    assert_eq!(plans(&a).len(), 10, "13 in the cohort, 3 already reported");
}

#[test]
fn resumes_a_full_cohort_in_reporting_and_a_complete_round_closes() {
    let c = cfg();
    let selected: Vec<u64> = (0..c.cohort() as u64).collect();
    let mut e = RoundEngine::resume(c, 3, 2, &selected, &[0, 1], 5_000).unwrap();
    // Selected before the restart: the device's report still counts.
    let a = e.handle(
        Event::Report {
            device: 7,
            round: 3,
        },
        5_001,
    );
    assert_eq!(
        a[0],
        Action::AcceptReport {
            device: 7,
            round: 3
        }
    );
    // A newcomer is steered away: the cohort is full.
    let a = e.handle(Event::CheckIn { device: 99 }, 5_002);
    assert!(
        matches!(a[0], Action::ComeBackAt { device: 99, .. }),
        "{a:?}"
    );

    let all: Vec<u64> = (0..c.target as u64).collect();
    let mut done = RoundEngine::resume(c, 3, 2, &all, &all, 6_000).unwrap();
    let a = done.handle(Event::Tick, 6_000);
    assert!(
        a.contains(&Action::CloseRound {
            round: 3,
            reports: c.target
        }),
        "{a:?}"
    );
}

#[test]
fn while_reports_are_collected_about_one_cohort_returns_per_retry_period() {
    let c = EngineConfig {
        pace_jitter_ms: 0,
        report_deadline_ms: 1_000_000,
        ..cfg()
    };
    let mut e = RoundEngine::new(c, 0).unwrap();
    check_in_all(&mut e, 0..13, 0); // the cohort: reporting starts
    let backs: Vec<u64> = check_in_all(&mut e, 100..152, 0)
        .iter()
        .filter_map(|a| match a {
            Action::ComeBackAt { at, .. } => Some(*at),
            _ => None,
        })
        .collect();
    // 13 devices per cohort: the first two cohorts after 2 s, then 4 s, 6 s, …
    assert_eq!(backs[..26], [2_000; 26]);
    assert_eq!(backs[26..39], [4_000; 13]);
    assert_eq!(backs[39..52], [6_000; 13]);
    // Never later than the deadline.
    let mut e = RoundEngine::new(
        EngineConfig {
            pace_jitter_ms: 0,
            ..cfg()
        },
        0,
    )
    .unwrap();
    check_in_all(&mut e, 0..13, 0);
    let far = check_in_all(&mut e, 100..1_000, 0);
    assert!(far.iter().all(|a| match a {
        Action::ComeBackAt { at, .. } => *at <= 10_000,
        _ => true,
    }));
}

#[test]
fn a_device_that_reported_during_selection_comes_back_after_the_retry_period() {
    let c = EngineConfig {
        pace_jitter_ms: 0,
        ..cfg()
    };
    let mut e = RoundEngine::new(c, 0).unwrap();
    e.handle(Event::CheckIn { device: 1 }, 0);
    let a = e.handle(
        Event::Report {
            device: 1,
            round: 1,
        },
        100,
    );
    assert_eq!(
        a,
        [Action::AcceptReport {
            device: 1,
            round: 1
        }]
    );
    // Selection lasts until 1 000 at most, but the round may fill and close
    // sooner: come back after `retry_ms`, not at the end of selection.
    let a = e.handle(Event::CheckIn { device: 1 }, 200);
    assert_eq!(
        a,
        [Action::ComeBackAt {
            device: 1,
            at: 1_000.min(200 + c.retry_ms)
        }]
    );
    let long = EngineConfig {
        selection_timeout_ms: 60_000,
        ..c
    };
    let mut e = RoundEngine::new(long, 0).unwrap();
    e.handle(Event::CheckIn { device: 1 }, 0);
    e.handle(
        Event::Report {
            device: 1,
            round: 1,
        },
        100,
    );
    let a = e.handle(Event::CheckIn { device: 1 }, 200);
    assert_eq!(
        a,
        [Action::ComeBackAt {
            device: 1,
            at: 2_200
        }]
    );
}

#[test]
fn invalid_settings_are_refused() {
    assert!(RoundEngine::new(EngineConfig { target: 0, ..cfg() }, 0).is_err());
    assert!(
        RoundEngine::new(
            EngineConfig {
                min_reports: 11,
                ..cfg()
            },
            0
        )
        .is_err()
    );
    assert!(
        RoundEngine::new(
            EngineConfig {
                over_selection: 0.5,
                ..cfg()
            },
            0
        )
        .is_err()
    );
}

/// Durations at the top of `u64` (a task specification does not bound
/// them) and clocks near it: times saturate, nothing overflows or panics.
#[test]
fn huge_durations_and_late_clocks_saturate_instead_of_overflowing() {
    let huge = EngineConfig {
        target: 2,
        over_selection: 1.0,
        min_reports: 1,
        selection_timeout_ms: u64::MAX,
        report_deadline_ms: u64::MAX,
        rounds: 2,
        pace_jitter_ms: u64::MAX,
        retry_ms: u64::MAX,
        seed: 1,
        max_participations: Some(u32::MAX),
        min_separation: u64::MAX,
        selection_window_ms: 0,
    };
    for start in [0, u64::MAX / 2, u64::MAX - 1] {
        let mut e = RoundEngine::new(huge, start).unwrap();
        assert_eq!(e.next_deadline(), Some(u64::MAX));
        let actions = check_in_all(&mut e, 0..5, start);
        assert_eq!(plans(&actions), vec![0, 1]);
        assert!(actions.contains(&Action::StartReporting {
            round: 1,
            selected: 2,
            deadline: u64::MAX,
        }));
        for a in &actions {
            if let Action::ComeBackAt { at, .. } = a {
                assert!(*at >= start, "{a:?}");
            }
        }
        e.handle(Event::Tick, u64::MAX);
        e.handle(
            Event::Report {
                device: 0,
                round: e.round(),
            },
            u64::MAX,
        );
        e.handle(Event::Tick, u64::MAX);
        let _ = e.next_deadline();
        // Resumption computes a deadline from the huge duration too.
        let resumed = RoundEngine::resume(huge, 1, 0, &[0, 1], &[], u64::MAX - 1).unwrap();
        assert_eq!(resumed.next_deadline(), Some(u64::MAX));
    }
}

/// Later than any come-back time the test settings hand out.
const HOUR: u64 = 3_600_000;

/// Runs one round: `devices` check in at `now`, the first `target` selected
/// ones report. Returns the devices that reported.
fn run_round(
    e: &mut RoundEngine,
    devices: impl IntoIterator<Item = DeviceId>,
    now: u64,
) -> Vec<DeviceId> {
    // A selection that has waited since the last close times out first.
    e.handle(Event::Tick, now);
    let round = e.round();
    let selected = plans(&check_in_all(e, devices, now));
    let reporting: Vec<DeviceId> = selected.iter().copied().take(10).collect();
    for &d in &reporting {
        e.handle(Event::Report { device: d, round }, now);
    }
    assert_eq!(e.closed(), round, "round {round} closed with {reporting:?}");
    reporting
}

#[test]
fn a_device_at_its_participation_limit_is_not_selected_again() {
    let limited = EngineConfig {
        max_participations: Some(2),
        ..cfg()
    };
    let mut e = RoundEngine::new(limited, 0).unwrap();
    let first = run_round(&mut e, 0..30, 0);
    assert_eq!(first, (0..10).collect::<Vec<_>>());
    assert_eq!(e.most_participations(), 1);
    let second = run_round(&mut e, 0..30, HOUR);
    assert_eq!(second, (0..10).collect::<Vec<_>>(), "one more time allowed");
    assert_eq!(e.most_participations(), 2);
    assert_eq!(e.participation(3), Participation { rounds: 2, last: 2 });
    // Round 3: devices 0..10 have used their two rounds; they are told to
    // come back, and the cohort is filled by the others.
    e.handle(Event::Tick, 2 * HOUR);
    let actions = check_in_all(&mut e, 0..30, 2 * HOUR);
    let chosen = plans(&actions);
    assert_eq!(chosen, (10..23).collect::<Vec<_>>());
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::ComeBackAt { device: 0, .. })),
        "{actions:?}"
    );
    assert_eq!(e.most_participations(), 2);
    // Selected but not reporting (dropped, or a straggler) does not count.
    assert_eq!(e.participation(22), Participation::default());
    // Without a limit nothing is counted (no memory per device).
    let mut free = RoundEngine::new(cfg(), 0).unwrap();
    run_round(&mut free, 0..30, 0);
    assert_eq!(free.most_participations(), 0);
    assert!(free.may_take_part(0));
}

#[test]
fn min_separation_keeps_a_device_out_of_the_next_rounds() {
    let apart = EngineConfig {
        min_separation: 2,
        rounds: 5,
        ..cfg()
    };
    let mut e = RoundEngine::new(apart, 0).unwrap();
    let first = run_round(&mut e, 0..30, 0);
    // Round 2: the first round's reporters wait one round.
    assert!(first.iter().all(|&d| !e.may_take_part(d)));
    let second = run_round(&mut e, 0..30, HOUR);
    assert!(second.iter().all(|d| !first.contains(d)), "{second:?}");
    // Round 3: two rounds after round 1, its reporters may come back.
    assert!(first.iter().all(|&d| e.may_take_part(d)));
    assert!(second.iter().all(|&d| !e.may_take_part(d)));
}

#[test]
fn participation_survives_a_restart() {
    let limited = EngineConfig {
        max_participations: Some(1),
        ..cfg()
    };
    let closed: Vec<(u64, Vec<DeviceId>)> = vec![(1, (0..10).collect())];
    let mut e = RoundEngine::resume(limited, 2, 1, &[], &[], 0).unwrap();
    e.restore_participation(closed.iter().map(|(r, d)| (*r, d.as_slice())));
    assert_eq!(e.most_participations(), 1);
    let chosen = plans(&check_in_all(&mut e, 0..30, 0));
    assert_eq!(chosen, (10..23).collect::<Vec<_>>());
}

fn come_back_time(actions: &[Action], device: DeviceId) -> Option<u64> {
    actions.iter().find_map(|a| match a {
        Action::ComeBackAt { device: d, at } if *d == device => Some(*at),
        _ => None,
    })
}

#[test]
fn checking_in_before_the_come_back_time_gains_nothing() {
    let run = |spam: bool| {
        let mut e = RoundEngine::new(cfg(), 0).unwrap();
        // 13 selected, device 13 told to come back.
        check_in_all(&mut e, 0..14, 0);
        let told = e.handle(Event::CheckIn { device: 13 }, 5);
        let at = come_back_time(&told, 13).unwrap_or_else(|| {
            // The first check-in already steered it.
            e.come_back_at[&13]
        });
        if spam {
            for t in 0..100 {
                let fx = e.handle(Event::CheckIn { device: 13 }, 10 + t);
                assert_eq!(fx, vec![Action::ComeBackAt { device: 13, at }], "spam {t}");
            }
        }
        // An honest latecomer is steered exactly as without the spam: the
        // spam drew no jitter and counted no cohort.
        let late = come_back_time(&e.handle(Event::CheckIn { device: 50 }, 200), 50).unwrap();
        (e, at, late)
    };
    let (_, at_quiet, late_quiet) = run(false);
    let (mut e, at, late) = run(true);
    assert_eq!((at, late), (at_quiet, late_quiet));
    assert!(at > 200, "{at}");
    // The round closes; the next selection starts at once. Device 13,
    // checking in before its time, is still not selected.
    for d in 0..10 {
        e.handle(
            Event::Report {
                device: d,
                round: 1,
            },
            300,
        );
    }
    assert_eq!(e.round(), 2);
    let early = e.handle(Event::CheckIn { device: 13 }, 301);
    assert_eq!(early, vec![Action::ComeBackAt { device: 13, at }]);
    assert!(!e.selected().contains(&13));
    // At its time it is.
    let on_time = e.handle(Event::CheckIn { device: 13 }, at);
    assert!(plans(&on_time).contains(&13), "{on_time:?}");
    assert!(!e.come_back_at.contains_key(&13), "its time is forgotten");
}

/// `cfg()` with a selection window of 300 ms (the selection timeout is 1 s).
fn windowed(seed: u64) -> EngineConfig {
    EngineConfig {
        selection_window_ms: 300,
        seed,
        ..cfg()
    }
}

/// Devices `devices` check in at 10 ms, inside the window, then come back
/// when told; the devices selected, in the order their plans went out.
fn windowed_selection(seed: u64, devices: std::ops::Range<DeviceId>) -> Vec<DeviceId> {
    let mut e = RoundEngine::new(windowed(seed), 0).unwrap();
    let mut back = Vec::new();
    for d in devices {
        let a = e.handle(Event::CheckIn { device: d }, 10);
        assert!(plans(&a).is_empty(), "no plan inside the window");
        let at = come_back_time(&a, d).expect("told to come back");
        assert!((300..=1_000).contains(&at), "{at}");
        // Checking in again at once gains nothing.
        assert_eq!(
            e.handle(Event::CheckIn { device: d }, 11),
            vec![Action::ComeBackAt { device: d, at }]
        );
        back.push((at, d));
    }
    back.sort_unstable();
    let mut selected = Vec::new();
    for (at, d) in back {
        selected.extend(plans(&e.handle(Event::CheckIn { device: d }, at)));
    }
    selected
}

#[test]
fn a_selection_window_draws_the_cohort_at_random_among_those_who_checked_in() {
    let chosen = windowed_selection(7, 0..40);
    assert_eq!(chosen.len(), 13, "a full cohort");
    let mut sorted = chosen.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), 13);
    assert_ne!(sorted, (0..13).collect::<Vec<_>>(), "not first come");
    // Uniform: over many seeds every device is picked about 13/40 of the
    // time, the first to check in as often as the last. With 4,000 draws
    // the standard deviation of a share is 0.0074; allow 5 of them.
    let draws = 4_000;
    let mut counts = [0u32; 40];
    for seed in 0..draws {
        for d in windowed_selection(seed, 0..40) {
            counts[d as usize] += 1;
        }
    }
    for (d, &c) in counts.iter().enumerate() {
        let share = f64::from(c) / draws as f64;
        assert!((share - 13.0 / 40.0).abs() < 0.037, "device {d}: {share}");
    }
}

#[test]
fn places_the_window_left_free_go_to_the_first_after_it() {
    let mut e = RoundEngine::new(windowed(3), 0).unwrap();
    // Five devices check in during the window: all five are picked.
    let mut back = Vec::new();
    for d in 0..5 {
        let a = e.handle(Event::CheckIn { device: d }, 50);
        back.push((come_back_time(&a, d).unwrap(), d));
    }
    // After the window, newcomers fill the other eight places at once, and
    // the five get their plans when they come back.
    let a = check_in_all(&mut e, 100..120, 400);
    assert_eq!(plans(&a), (100..108).collect::<Vec<_>>());
    back.sort_unstable();
    let mut picked = Vec::new();
    for (at, d) in back {
        picked.extend(plans(&e.handle(Event::CheckIn { device: d }, at.max(400))));
    }
    assert_eq!(picked.len(), 5);
    assert_eq!(e.selected().len(), 13);
}

#[test]
fn a_window_as_long_as_the_timeout_is_refused() {
    let cfg = EngineConfig {
        selection_window_ms: 1_000,
        ..cfg()
    };
    assert!(
        RoundEngine::new(cfg, 0)
            .unwrap_err()
            .contains("selection_window_ms")
    );
}

#[test]
fn a_held_close_waits_for_its_settlement() {
    let mut e = RoundEngine::new(cfg(), 0).unwrap().hold_closes();
    check_in_all(&mut e, 0..13, 0);
    let log = report_all(&mut e, 0..10, 1, 100);
    assert!(log.contains(&Action::CloseRound {
        round: 1,
        reports: 10
    }));
    // Held: round 1 is still the open round, but closing.
    assert!(e.closing());
    assert_eq!((e.round(), e.closed()), (1, 0));
    assert_eq!(e.next_deadline(), None);
    let late = e.handle(
        Event::Report {
            device: 11,
            round: 1,
        },
        200,
    );
    assert!(matches!(
        late[..],
        [Action::RefuseReport {
            reason: Refusal::NotOpen,
            ..
        }]
    ));
    assert!(matches!(
        e.handle(Event::CheckIn { device: 20 }, 200)[..],
        [Action::ComeBackAt { device: 20, .. }]
    ));
    // Abandoned when unmasking fails: round 1 is retried.
    let a = e.settle(Err("unmasking failed".into()), 300);
    assert!(
        matches!(&a[..], [Action::AbandonRound { round: 1, reason }] if reason == "unmasking failed")
    );
    assert!(!e.closing());
    assert_eq!((e.round(), e.closed()), (1, 0));
    // Second attempt, settled: round 2 opens.
    check_in_all(&mut e, 100..113, 400);
    for d in 100..110 {
        e.handle(
            Event::Report {
                device: d,
                round: 1,
            },
            500,
        );
    }
    assert!(e.closing());
    assert!(e.settle(Ok(()), 600).is_empty());
    assert_eq!((e.round(), e.closed()), (2, 1));
    // Settling outside the closing phase does nothing.
    assert!(e.settle(Ok(()), 700).is_empty());
    assert_eq!(e.closed(), 1);
}
