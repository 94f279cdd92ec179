//! A federated task end to end: a coordinator and five agents speaking real
//! QUIC with mutual TLS on loopback, training on the embedded data.

use std::sync::Arc;

use fleet_aggregation::StrategyConfig;
use fleet_aggregation::codec::Codec;
use fleet_coordinator::engine::EngineConfig;
use fleet_coordinator::server::{Coordinator, TaskConfig};
use fleet_edge_agent::session::{LocalData, session};
use fleet_models::data::embedded;
use fleet_models::data::fashion::Split;
use fleet_models::data::partition::{Scheme, partition};
use fleet_models::{Backend, ModelSpec, TrainConfig, evaluate};
use fleet_protocol::tls::{
    CertificateAuthority, RevocationList, client_config, device_key_and_csr, server_config,
};

#[tokio::test]
async fn five_agents_train_a_model_over_quic() {
    let ca = CertificateAuthority::create("e2e CA").unwrap();
    let (scert, skey) = ca.issue_server(&["localhost".into()], 1).unwrap();
    let cfg = server_config(ca.cert(), scert, skey, Arc::new(RevocationList::default())).unwrap();
    let endpoint = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();

    let spec = ModelSpec::fashion_2nn();
    let rounds = 3;
    let task = TaskConfig {
        id: 1,
        spec: spec.clone(),
        train: TrainConfig {
            epochs: 2,
            ..TrainConfig::default()
        },
        strategy: StrategyConfig::fedavg(),
        codec: Codec::F16,
        dp: None,
        engine: EngineConfig {
            target: 3,
            over_selection: 1.0,
            min_reports: 2,
            selection_timeout_ms: 2_000,
            report_deadline_ms: 3_000,
            rounds,
            pace_jitter_ms: 50,
            seed: 1,
        },
        seed: 5,
    };
    let coordinator = Arc::new(Coordinator::new(task).unwrap());
    let initial = coordinator.global().await;
    let server = {
        let c = coordinator.clone();
        tokio::spawn(async move { c.serve(endpoint).await })
    };

    let train = Arc::new(embedded::load(Split::Train).unwrap());
    let parts = partition(train.labels(), train.classes(), 5, Scheme::Iid, 2).unwrap();
    let mut agents = Vec::new();
    for (k, indices) in parts.clients.into_iter().enumerate() {
        let (key, csr) = device_key_and_csr().unwrap();
        let cert = ca.issue_device(&csr, 100 + k as u64, 1).unwrap();
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(client_config(ca.cert(), cert, key).unwrap());
        let data = LocalData {
            dataset: train.clone(),
            indices: Arc::new(indices),
        };
        agents.push(tokio::spawn(async move {
            session(&ep, addr, "localhost", data, usize::MAX).await
        }));
    }
    let mut reports = Vec::new();
    for a in agents {
        reports.push(a.await.unwrap().expect("agent session"));
    }
    tokio::time::timeout(std::time::Duration::from_secs(30), server)
        .await
        .expect("coordinator finishes")
        .unwrap();

    let history = coordinator.history().await;
    assert_eq!(history.len(), rounds as usize);
    assert!(
        history.iter().all(|r| (2..=3).contains(&r.reports)),
        "{history:?}"
    );
    // Every report in a closed round was acknowledged to its agent. An agent may
    // also see a report acknowledged in an attempt that was later abandoned
    // (the round is then retried), so acknowledgements can exceed reports.
    let accepted: usize = reports.iter().map(|r| r.accepted.len()).sum();
    assert!(
        accepted >= history.iter().map(|r| r.reports).sum::<usize>(),
        "{reports:?} / {history:?}"
    );
    assert!(
        reports
            .iter()
            .flat_map(|r| &r.accepted)
            .all(|&round| (1..=rounds).contains(&round))
    );
    for r in reports.iter().filter(|r| !r.accepted.is_empty()) {
        let bytes = r.accepted.len() as u64 * 2 * spec.layout().total as u64;
        assert!(r.bytes_up >= bytes, "f16 updates: {r:?}");
    }
    let test = embedded::load(Split::Test).unwrap();
    let before = evaluate(&spec, &initial, test.view(), Backend::DEFAULT).unwrap();
    let after = evaluate(
        &spec,
        &coordinator.global().await,
        test.view(),
        Backend::DEFAULT,
    )
    .unwrap();
    assert!(
        after.accuracy > 0.7 && after.accuracy > before.accuracy + 0.4,
        "{before:?} → {after:?}"
    );
}
