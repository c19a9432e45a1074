//! How many pods a WarmPool needs and which to drain: a pure function of what was observed.

use std::time::{Duration, SystemTime};

use crate::crd::WarmPoolSpec;

/// One pod of a pool as the controller sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PodView {
    pub name: String,
    /// The pod is gone for good (phase Failed or Succeeded) and must be replaced.
    pub failed: bool,
    /// Its manager passes its readiness probe.
    pub ready: bool,
    /// Since when it has been draining, if it is.
    pub draining_since: Option<SystemTime>,
    /// Its live sessions from its last `/v1/load`; `None` when unknown.
    pub sessions: Option<u64>,
    pub created: SystemTime,
}

/// What to do to a pool.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Serving pods the load asks for, within `[replicas, maxReplicas]`.
    pub desired: u32,
    /// Pods to create.
    pub create: u32,
    /// Pods to start draining, emptiest first.
    pub drain: Vec<String>,
    /// Draining pods to take back into service, because the load came back.
    pub undrain: Vec<String>,
    /// Pods to delete: failed ones, and drained ones that are empty or out of time.
    pub delete: Vec<String>,
    /// When the pool last needed every pod it serves with; carried to the next call.
    pub needed_at: SystemTime,
}

/// Pods needed for `sessions`: enough that they fill `targetUtilization` of them with
/// `headroomSessions` to spare, within `[replicas, maxReplicas]`.
pub fn desired_pods(spec: &WarmPoolSpec, sessions: u64) -> u32 {
    let per_pod = f64::from(spec.pod_capacity()) * spec.target_utilization.clamp(0.01, 1.0);
    let wanted = (sessions as f64 + f64::from(spec.headroom_sessions.max(0))) / per_pod;
    let min = spec.replicas.max(0) as u32;
    let max = (spec.max_replicas.max(0) as u32).max(min);
    (wanted.ceil() as u32).clamp(min, max)
}

/// The plan for `pods` at `now`. `needed_at` is the previous plan's (`None` at first), so
/// that pods are removed only after the load has stayed low for `scaleDownDelaySeconds`:
/// scale-up is at once, scale-down is slow, and a load that dips and recovers moves nothing.
pub fn plan(
    spec: &WarmPoolSpec,
    pods: &[PodView],
    now: SystemTime,
    needed_at: Option<SystemTime>,
) -> Plan {
    let mut plan = Plan {
        desired: 0,
        create: 0,
        drain: Vec::new(),
        undrain: Vec::new(),
        delete: Vec::new(),
        needed_at: needed_at.unwrap_or(now),
    };
    plan.delete = pods
        .iter()
        .filter(|p| p.failed)
        .map(|p| p.name.clone())
        .collect();
    let live = || pods.iter().filter(|p| !p.failed);
    let sessions: u64 = live().filter_map(|p| p.sessions).sum();
    plan.desired = desired_pods(spec, sessions);

    let serving: Vec<&PodView> = live().filter(|p| p.draining_since.is_none()).collect();
    let mut draining: Vec<&PodView> = live().filter(|p| p.draining_since.is_some()).collect();
    let have = serving.len() as u32;

    if plan.desired >= have {
        plan.needed_at = now;
        // Draining pods are warm already: take them back, fullest first, before creating.
        draining.sort_by_key(|p| std::cmp::Reverse(p.sessions.unwrap_or(0)));
        let short = (plan.desired - have) as usize;
        plan.undrain = draining
            .iter()
            .take(short)
            .map(|p| p.name.clone())
            .collect();
        plan.create = (short - plan.undrain.len()) as u32;
        draining.drain(..plan.undrain.len());
    } else {
        let delay = Duration::from_secs(spec.scale_down_delay_seconds.max(0) as u64);
        let low_for = now.duration_since(plan.needed_at).unwrap_or_default();
        if low_for >= delay {
            // Emptiest first: pods not ready yet, then the fewest sessions, then the newest.
            let mut order = serving.clone();
            order.sort_by_key(|p| {
                (
                    p.ready,
                    p.sessions.unwrap_or(u64::MAX),
                    std::cmp::Reverse(p.created),
                )
            });
            let surplus = (have - plan.desired) as usize;
            plan.drain = order.iter().take(surplus).map(|p| p.name.clone()).collect();
        }
    }

    let timeout = Duration::from_secs(spec.drain_timeout_seconds.max(0) as u64);
    for pod in draining {
        let since = pod.draining_since.unwrap_or(now);
        // Empty: it says so, or it never became ready and so never took a session.
        let empty = pod.sessions == Some(0) || (!pod.ready && pod.sessions.is_none());
        if empty || now.duration_since(since).unwrap_or_default() >= timeout {
            plan.delete.push(pod.name.clone());
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::crd::PoolRuntime;

    fn spec(replicas: i32, max: i32) -> WarmPoolSpec {
        WarmPoolSpec {
            runtime: PoolRuntime {
                wasm: Some("python".into()),
                container: None,
            },
            replicas,
            max_replicas: max,
            sessions_per_pod: 100,
            target_utilization: 0.5,
            headroom_sessions: 10,
            scale_down_delay_seconds: 300,
            drain_timeout_seconds: 600,
            template: None,
            network: None,
            session_store: None,
        }
    }

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    fn pod(name: &str, sessions: u64) -> PodView {
        PodView {
            name: name.into(),
            failed: false,
            ready: true,
            draining_since: None,
            sessions: Some(sessions),
            created: t(0),
        }
    }

    fn names(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }

    #[test]
    fn desired_follows_the_formula_within_bounds() {
        let s = spec(1, 10);
        // ceil((sessions + 10) / 50), at least 1, at most 10.
        for (sessions, want) in [
            (0, 1),
            (40, 1),
            (41, 2),
            (90, 2),
            (91, 3),
            (240, 5),
            (10_000, 10),
        ] {
            assert_eq!(desired_pods(&s, sessions), want, "{sessions} sessions");
        }
        assert_eq!(desired_pods(&spec(3, 10), 0), 3, "the floor is replicas");
        assert_eq!(
            desired_pods(&spec(4, 2), 0),
            4,
            "a floor above the ceiling wins"
        );
    }

    #[test]
    fn an_empty_pool_gets_its_minimum() {
        let p = plan(&spec(2, 5), &[], t(0), None);
        assert_eq!((p.desired, p.create), (2, 2));
        assert!(p.drain.is_empty() && p.delete.is_empty());
    }

    #[test]
    fn load_up_scales_up_at_once() {
        let pods = [pod("a", 45), pod("b", 45)];
        let p = plan(&spec(1, 10), &pods, t(10), Some(t(0)));
        // 90 sessions + 10 headroom over 50 a pod: 2 pods... then one more session.
        assert_eq!((p.desired, p.create), (2, 0));
        let pods = [pod("a", 46), pod("b", 45)];
        let p = plan(&spec(1, 10), &pods, t(10), Some(t(0)));
        assert_eq!((p.desired, p.create), (3, 1));
        assert_eq!(p.needed_at, t(10), "a need resets the scale-down clock");
    }

    #[test]
    fn max_replicas_caps_the_scale_up() {
        let pods = [pod("a", 100), pod("b", 100)];
        let p = plan(&spec(1, 3), &pods, t(0), None);
        assert_eq!((p.desired, p.create), (3, 1));
    }

    #[test]
    fn load_down_drains_only_after_the_delay_and_emptiest_first() {
        let pods = [pod("a", 5), pod("b", 0), pod("c", 2)];
        // Needed 3 pods at t=0; load fell to 7 sessions: 1 pod is enough.
        let early = plan(&spec(1, 10), &pods, t(299), Some(t(0)));
        assert_eq!(early.desired, 1);
        assert!(early.drain.is_empty(), "inside the delay nothing moves");
        assert_eq!(early.needed_at, t(0), "the clock keeps running");
        let late = plan(&spec(1, 10), &pods, t(300), Some(t(0)));
        assert_eq!(names(&late.drain), ["b", "c"]);
        assert!(
            late.delete.is_empty(),
            "live pods are drained, never deleted outright"
        );
    }

    #[test]
    fn not_ready_pods_are_drained_before_ready_ones() {
        let mut fresh = pod("new", 0);
        fresh.ready = false;
        fresh.sessions = None;
        let pods = [pod("old", 0), fresh];
        let p = plan(&spec(1, 10), &pods, t(1000), Some(t(0)));
        assert_eq!(names(&p.drain), ["new"]);
    }

    #[test]
    fn the_newest_of_equally_empty_pods_goes_first() {
        let mut young = pod("young", 0);
        young.created = t(50);
        let pods = [pod("old", 0), young];
        let p = plan(&spec(1, 10), &pods, t(1000), Some(t(0)));
        assert_eq!(names(&p.drain), ["young"]);
    }

    #[test]
    fn never_below_the_minimum() {
        let pods = [pod("a", 0), pod("b", 0)];
        let p = plan(&spec(2, 10), &pods, t(10_000), Some(t(0)));
        assert_eq!(p.desired, 2);
        assert!(p.drain.is_empty());
    }

    #[test]
    fn drained_pods_are_deleted_once_empty_or_out_of_time() {
        let mut empty = pod("empty", 0);
        empty.draining_since = Some(t(100));
        let mut busy = pod("busy", 3);
        busy.draining_since = Some(t(100));
        let mut stuck = pod("stuck", 3);
        stuck.draining_since = Some(t(0));
        // Not ready for a moment, but it had sessions: they may still be reachable.
        let mut flaky = pod("flaky", 2);
        flaky.draining_since = Some(t(100));
        flaky.ready = false;
        let mut never = pod("never", 0);
        never.draining_since = Some(t(100));
        (never.ready, never.sessions) = (false, None);
        let pods = [pod("a", 3), empty, busy, stuck, flaky, never];
        let p = plan(&spec(1, 10), &pods, t(600), Some(t(0)));
        let mut deleted = names(&p.delete);
        deleted.sort_unstable();
        assert_eq!(deleted, ["empty", "never", "stuck"]);
        assert!(p.drain.is_empty() && p.create == 0);
    }

    #[test]
    fn returning_load_takes_back_draining_pods_before_creating() {
        let mut d1 = pod("d1", 10);
        d1.draining_since = Some(t(0));
        let mut d2 = pod("d2", 20);
        d2.draining_since = Some(t(0));
        // 40 + 30 + 10 sessions + 10 headroom over 50: 2 serving pods needed, 1 serving.
        let pods = [pod("a", 40), d1, d2];
        let p = plan(&spec(1, 10), &pods, t(10), Some(t(0)));
        assert_eq!(p.desired, 2);
        assert_eq!(
            names(&p.undrain),
            ["d2"],
            "the fullest draining pod comes back"
        );
        assert_eq!(p.create, 0);
        assert!(
            p.delete.is_empty(),
            "d1 keeps draining, it still has sessions"
        );
    }

    #[test]
    fn failed_pods_are_replaced() {
        let mut dead = pod("dead", 0);
        dead.failed = true;
        let pods = [pod("a", 0), dead];
        let p = plan(&spec(2, 10), &pods, t(0), None);
        assert_eq!(names(&p.delete), ["dead"]);
        assert_eq!(p.create, 1);
    }

    #[test]
    fn a_load_that_dips_and_recovers_does_not_flap() {
        let s = spec(1, 10);
        let high = [pod("a", 45), pod("b", 45)];
        let low = [pod("a", 5), pod("b", 5)];
        let mut needed = None;
        let mut moves = 0;
        // Load alternates every 100 s between needing 2 pods and needing 1, for an hour.
        for step in 0..36u64 {
            let pods = if step % 2 == 0 { &high } else { &low };
            let p = plan(&s, pods, t(step * 100), needed);
            moves += p.create as usize + p.drain.len() + p.delete.len();
            needed = Some(p.needed_at);
        }
        assert_eq!(moves, 0, "a 300 s delay outlasts every 100 s dip");
        // Once the load stays low past the delay, one pod is drained, and only once.
        let mut pods = low.to_vec();
        let mut drained = Vec::new();
        for step in 36..48u64 {
            let p = plan(&s, &pods, t(step * 100), needed);
            for pod in pods.iter_mut().filter(|pod| p.drain.contains(&pod.name)) {
                pod.draining_since = Some(t(step * 100));
            }
            drained.extend(p.drain);
            needed = Some(p.needed_at);
        }
        assert_eq!(drained.len(), 1, "{drained:?}");
    }
}
