//! What every [`MachineProvider`] promises, checked the same way for each
//! (docker against the real engine, gce against the Compute Engine fake):
//! start → list/status → stop → start again → delete, with the idempotent
//! calls repeated and unknown machines reported as gone, not as errors.
//! Also the waits every provider test needs (a test binary uses a part).
#![allow(dead_code)]

use std::time::Duration;

use pubrun_pools::provider::{MachineLaunch, MachineProvider, ProviderStatus};

/// The provider under test and how it names things.
pub struct Subject<'a> {
    pub provider: &'a dyn MachineProvider,
    /// Two pools no other test uses; their machines must not mix.
    pub pools: [&'a str; 2],
    /// The launch of machine `n` of `pool`.
    pub launch: &'a dyn Fn(&str, u32) -> MachineLaunch,
    /// How long a machine may take to reach a state.
    pub patience: Duration,
}

impl Subject<'_> {
    async fn reaches(&self, name: &str, want: ProviderStatus) {
        reaches(self.provider, name, want, self.patience).await
    }

    async fn listed(&self, pool: &str) -> Vec<(String, ProviderStatus)> {
        self.provider.list(pool).await.unwrap()
    }

    async fn within<T>(&self, what: &str, f: impl std::future::Future<Output = T>) -> T {
        pubrun_testkit::within(what, self.patience, f).await
    }
}

/// Polls `p` until machine `name` has `want`; panics after `patience`.
pub async fn reaches(
    p: &dyn MachineProvider,
    name: &str,
    want: ProviderStatus,
    patience: Duration,
) {
    reaches_unless(p, name, want, patience, |_| None).await
}

/// [`reaches`], but a status for which `hopeless` says why (e.g. the
/// machine's log when it stopped on its own) fails the wait at once.
pub async fn reaches_unless(
    p: &dyn MachineProvider,
    name: &str,
    want: ProviderStatus,
    patience: Duration,
    hopeless: impl Fn(ProviderStatus) -> Option<String>,
) {
    let hopeless = &hopeless;
    let probe = || async move {
        let got = p.status(name).await.unwrap();
        if got == want {
            return Ok(());
        }
        if let Some(why) = hopeless(got) {
            panic!("{name}: {why}");
        }
        Err(got)
    };
    pubrun_testkit::poll_until_async(patience, Duration::from_millis(50), probe, |got| {
        format!("{name}: still {got:?} after {patience:?}, want {want:?}")
    })
    .await
}

/// Runs the whole contract; leaves no machine behind when it passes.
pub async fn machine_contract(s: &Subject<'_>) {
    let p = s.provider;
    let [pool, other] = s.pools;
    let first = (s.launch)(pool, 1);
    let name = first.name.as_str();

    // Unknown machines are gone, and stopping or deleting one is not an error.
    assert_eq!(p.status(name).await.unwrap(), ProviderStatus::Gone);
    s.within("stop unknown", p.stop(name, false)).await.unwrap();
    s.within("delete unknown", p.stop(name, true))
        .await
        .unwrap();
    assert!(s.listed(pool).await.is_empty());

    // Start: an id at once, running soon after.
    let id = s.within("start", p.start(&first)).await.unwrap();
    assert!(!id.is_empty(), "start returned an empty id");
    s.reaches(name, ProviderStatus::Running).await;
    // Starting a running machine changes nothing.
    assert_eq!(
        s.within("start running", p.start(&first)).await.unwrap(),
        id
    );

    // Lists are per pool.
    let second = (s.launch)(other, 1);
    s.within("start other", p.start(&second)).await.unwrap();
    s.reaches(&second.name, ProviderStatus::Running).await;
    assert_eq!(
        s.listed(pool).await,
        [(name.to_string(), ProviderStatus::Running)]
    );
    assert_eq!(
        s.listed(other).await,
        [(second.name.clone(), ProviderStatus::Running)]
    );

    // Stop: still there and listed as stopped; stopping again is fine.
    s.within("stop", p.stop(name, false)).await.unwrap();
    s.reaches(name, ProviderStatus::Stopped).await;
    assert_eq!(
        s.listed(pool).await,
        [(name.to_string(), ProviderStatus::Stopped)]
    );
    s.within("stop again", p.stop(name, false)).await.unwrap();

    // Start again: the same machine, not a second one.
    assert_eq!(s.within("start again", p.start(&first)).await.unwrap(), id);
    s.reaches(name, ProviderStatus::Running).await;
    assert_eq!(
        s.listed(pool).await,
        [(name.to_string(), ProviderStatus::Running)]
    );

    // Delete: gone and unlisted; deleting or stopping it again is fine.
    s.within("delete", p.stop(name, true)).await.unwrap();
    s.reaches(name, ProviderStatus::Gone).await;
    assert!(s.listed(pool).await.is_empty());
    s.within("delete again", p.stop(name, true)).await.unwrap();
    s.within("stop deleted", p.stop(name, false)).await.unwrap();
    // The other pool's machine was left alone.
    assert_eq!(
        p.status(&second.name).await.unwrap(),
        ProviderStatus::Running
    );

    s.within("delete other", p.stop(&second.name, true))
        .await
        .unwrap();
    s.reaches(&second.name, ProviderStatus::Gone).await;
    assert!(s.listed(other).await.is_empty());
}
