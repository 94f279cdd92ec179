//! A UDP relay that impairs the traffic between QUIC peers on loopback (the
//! kernels the tests run on have no `netem`): loss, delay with jitter (and
//! so reordering), duplication and a bandwidth cap, in each direction, and
//! NAT rebinding (the relay moves its side of every flow to a new port).
//!
//! Clients send to [`Relay::addr`]; the relay forwards each client's
//! datagrams to the upstream address from a socket of its own per client,
//! as a NAT does, and the answers back to the client. It runs on a thread
//! of its own with a current-thread runtime, so synchronous tests that
//! drive processes can use it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::net::UdpSocket;
use tokio::time::Instant;

/// What the relay does to each datagram, in each direction.
#[derive(Debug, Clone, Copy)]
pub struct Impairment {
    /// Probability that a datagram is dropped.
    pub loss: f64,
    /// Mean one-way delay (ms).
    pub delay_ms: u64,
    /// The delay is uniform in `delay_ms ± jitter_ms`; datagrams overtake
    /// each other when it varies by more than their spacing.
    pub jitter_ms: u64,
    /// Probability that a datagram is sent twice.
    pub duplicate: f64,
    /// Bytes per second each direction carries (`None`: no cap); datagrams
    /// queue behind each other, and the delay comes on top.
    pub bytes_per_sec: Option<u64>,
}

/// What the relay did so far.
#[derive(Debug, Default)]
pub struct Counts {
    /// Datagrams received from either side.
    pub received: AtomicU64,
    /// Datagrams dropped.
    pub dropped: AtomicU64,
    /// Datagrams sent twice.
    pub duplicated: AtomicU64,
}

/// A running relay (stopped when dropped).
pub struct Relay {
    /// Where clients send.
    pub addr: SocketAddr,
    /// What it did.
    pub counts: Arc<Counts>,
    generation: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// Starts a relay to `upstream` impairing traffic with `imp`; its random
    /// choices come from `seed`.
    pub fn start(upstream: SocketAddr, imp: Impairment, seed: u64) -> Relay {
        let counts = Arc::new(Counts::default());
        let generation = Arc::new(AtomicU64::new(0));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let shared = Shared {
            imp,
            counts: counts.clone(),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
            free_at: [Mutex::new(None), Mutex::new(None)],
        };
        let gen_ = generation.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("relay runtime");
            rt.block_on(async move {
                let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("relay bind"));
                addr_tx.send(front.local_addr().unwrap()).unwrap();
                tokio::select! {
                    _ = run(front, upstream, Arc::new(shared), gen_) => {}
                    _ = stopped => {}
                }
            });
        });
        let addr = addr_rx.recv().expect("relay address");
        Relay {
            addr,
            counts,
            generation,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// NAT rebinding: from now on the relay forwards every client's
    /// datagrams from a new port, as a NAT that dropped its mapping does.
    pub fn rebind(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Shared {
    imp: Impairment,
    counts: Arc<Counts>,
    rng: Mutex<ChaCha8Rng>,
    /// When each direction's link is free again (bandwidth cap): towards
    /// the server, towards the client.
    free_at: [Mutex<Option<Instant>>; 2],
}

impl Shared {
    /// Sends `pkt` with `send` after the impairment, towards `dir` (0: the
    /// server, 1: the client).
    fn forward(self: &Arc<Self>, dir: usize, pkt: Vec<u8>, send: impl SendDatagram) {
        self.counts.received.fetch_add(1, Ordering::Relaxed);
        let (drop, copies, delays) = {
            let mut rng = self.rng.lock().unwrap();
            let drop = rng.random::<f64>() < self.imp.loss;
            let copies = if rng.random::<f64>() < self.imp.duplicate {
                2
            } else {
                1
            };
            let mut delay = || {
                let j = self.imp.jitter_ms.min(self.imp.delay_ms) as i64;
                let d = self.imp.delay_ms as i64 + rng.random_range(-j..=j);
                Duration::from_millis(d.max(0) as u64)
            };
            (drop, copies, [delay(), delay()])
        };
        if drop {
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if copies == 2 {
            self.counts.duplicated.fetch_add(1, Ordering::Relaxed);
        }
        let now = Instant::now();
        let departs = match self.imp.bytes_per_sec {
            None => now,
            Some(rate) => {
                let mut free = self.free_at[dir].lock().unwrap();
                let start = free.map_or(now, |f| f.max(now));
                let done = start + Duration::from_secs_f64(pkt.len() as f64 / rate.max(1) as f64);
                *free = Some(done);
                done
            }
        };
        for delay in delays.into_iter().take(copies) {
            let pkt = pkt.clone();
            let send = send.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(departs + delay).await;
                send.send(&pkt).await;
            });
        }
    }
}

/// Where a datagram goes once its delay is over.
trait SendDatagram: Clone + Send + 'static {
    fn send(&self, pkt: &[u8]) -> impl std::future::Future<Output = ()> + Send;
}

/// To the server, from the relay's socket for one client.
#[derive(Clone)]
struct ToServer(Arc<UdpSocket>);

impl SendDatagram for ToServer {
    async fn send(&self, pkt: &[u8]) {
        let _ = self.0.send(pkt).await;
    }
}

/// To a client, from the relay's front socket.
#[derive(Clone)]
struct ToClient(Arc<UdpSocket>, SocketAddr);

impl SendDatagram for ToClient {
    async fn send(&self, pkt: &[u8]) {
        let _ = self.0.send_to(pkt, self.1).await;
    }
}

async fn run(
    front: Arc<UdpSocket>,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    generation: Arc<AtomicU64>,
) {
    // Per client: the generation its upstream socket belongs to, and it.
    let mut flows: HashMap<SocketAddr, (u64, Arc<UdpSocket>)> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, client)) = front.recv_from(&mut buf).await else {
            continue;
        };
        let now_gen = generation.load(Ordering::Acquire);
        let up = match flows.get(&client) {
            Some((g, s)) if *g == now_gen => s.clone(),
            _ => {
                let Ok(s) = UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                if s.connect(upstream).await.is_err() {
                    continue;
                }
                let s = Arc::new(s);
                // Answers to this socket go back to the client; a socket
                // left behind by a rebinding keeps relaying late answers.
                let (back, front2, shared2) = (s.clone(), front.clone(), shared.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    while let Ok(n) = back.recv(&mut buf).await {
                        shared2.forward(1, buf[..n].to_vec(), ToClient(front2.clone(), client));
                    }
                });
                flows.insert(client, (now_gen, s.clone()));
                s
            }
        };
        shared.forward(0, buf[..n].to_vec(), ToServer(up));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server behind the relay: every datagram sent comes back at
    /// most once... or twice when duplicated, after the delay each way.
    #[test]
    fn the_relay_delays_drops_and_duplicates_as_told() {
        let echo = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let server = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = echo.recv_from(&mut buf) {
                let _ = echo.send_to(&buf[..n], from);
            }
        });
        let imp = Impairment {
            loss: 0.2,
            delay_ms: 30,
            jitter_ms: 5,
            duplicate: 0.1,
            bytes_per_sec: None,
        };
        let relay = Relay::start(server, imp, 7);
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let sent = 400;
        let start = std::time::Instant::now();
        for i in 0..sent {
            client
                .send_to(&(i as u32).to_le_bytes(), relay.addr)
                .unwrap();
        }
        let mut got = 0;
        let mut first = None;
        let mut buf = [0u8; 16];
        while client.recv_from(&mut buf).is_ok() {
            first.get_or_insert_with(|| start.elapsed());
            got += 1;
        }
        // Both ways: a datagram survives with probability 0.8² = 0.64 and
        // is doubled now and then; expect about 256 back, give or take.
        assert!((180..=340).contains(&got), "{got} of {sent} came back");
        let dropped = relay.counts.dropped.load(Ordering::Relaxed);
        assert!(dropped > 60, "{dropped} dropped");
        assert!(relay.counts.duplicated.load(Ordering::Relaxed) > 10);
        // Two one-way delays of 25 ms at least.
        assert!(first.unwrap() >= Duration::from_millis(50), "{first:?}");
    }
}
