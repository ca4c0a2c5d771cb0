//! The fault-injecting proxy of one link: a loopback listener the dialing node connects to,
//! forwarding each connection to the listening node. It is frame-aware (driftless frames are
//! `[u32 big-endian length][payload]`, see `driftless-wire`), so it can partition (refuse and close
//! connections, or drop one direction's frames), delay, duplicate and reorder whole frames, and
//! truncate a frame part-way and close.
//!
//! It never looks inside a payload, and it never delivers a frame after one it dropped on the same
//! connection and direction: a TCP connection either delivers a prefix of what was sent or
//! breaks. Reordering and duplication are the exceptions, on purpose: they are the faults.

use crate::plan::{Cut, Direction, Noise};
use driftless_sim::Rng;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How long a frame held back for reordering waits for the next one before it is sent alone.
const REORDER_HOLD_MAX: Duration = Duration::from_millis(200);
/// How long connecting to the listening node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What the proxy did, counted since it started.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub connections: AtomicU64,
    pub refused: AtomicU64,
    pub closed_by_partition: AtomicU64,
    pub frames: AtomicU64,
    pub dropped: AtomicU64,
    pub delayed: AtomicU64,
    pub duplicated: AtomicU64,
    pub reordered: AtomicU64,
    pub truncated: AtomicU64,
}

/// A copy of [`ProxyStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyCounts {
    pub connections: u64,
    pub refused: u64,
    pub closed_by_partition: u64,
    pub frames: u64,
    pub dropped: u64,
    pub delayed: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub truncated: u64,
}

impl ProxyCounts {
    pub fn add(&mut self, o: &ProxyCounts) {
        self.connections += o.connections;
        self.refused += o.refused;
        self.closed_by_partition += o.closed_by_partition;
        self.frames += o.frames;
        self.dropped += o.dropped;
        self.delayed += o.delayed;
        self.duplicated += o.duplicated;
        self.reordered += o.reordered;
        self.truncated += o.truncated;
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct LinkFaults {
    cut: Option<Cut>,
    noise: Noise,
}

#[derive(Debug)]
struct Control {
    faults: Mutex<LinkFaults>,
    /// Bumped on every change, so open connections re-check the faults.
    changed: watch::Sender<u64>,
    stats: ProxyStats,
    seeds: Mutex<Rng>,
}

impl Control {
    fn faults(&self) -> LinkFaults {
        *self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn next_seed(&self) -> u64 {
        self.seeds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .next_u64()
    }
}

/// One link's proxy. Its tasks run on the runtime it was started on, until that runtime stops.
#[derive(Debug, Clone)]
pub struct Proxy {
    pub addr: SocketAddr,
    control: Arc<Control>,
}

impl Proxy {
    /// Listens on `bind` and forwards every accepted connection to `target`.
    pub async fn start(bind: SocketAddr, target: SocketAddr, seed: u64) -> io::Result<Proxy> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let (changed, _) = watch::channel(0);
        let control = Arc::new(Control {
            faults: Mutex::new(LinkFaults::default()),
            changed,
            stats: ProxyStats::default(),
            seeds: Mutex::new(Rng::new(seed)),
        });
        tokio::spawn(accept(listener, target, control.clone()));
        Ok(Proxy { addr, control })
    }

    fn update(&self, f: impl FnOnce(&mut LinkFaults)) {
        f(&mut self
            .control
            .faults
            .lock()
            .unwrap_or_else(|p| p.into_inner()));
        self.control.changed.send_modify(|n| *n += 1);
    }

    /// Partitions the link (`Some`) or heals it (`None`).
    pub fn set_cut(&self, cut: Option<Cut>) {
        self.update(|f| f.cut = cut);
    }

    pub fn set_noise(&self, noise: Noise) {
        self.update(|f| f.noise = noise);
    }

    pub fn counts(&self) -> ProxyCounts {
        let s = &self.control.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProxyCounts {
            connections: get(&s.connections),
            refused: get(&s.refused),
            closed_by_partition: get(&s.closed_by_partition),
            frames: get(&s.frames),
            dropped: get(&s.dropped),
            delayed: get(&s.delayed),
            duplicated: get(&s.duplicated),
            reordered: get(&s.reordered),
            truncated: get(&s.truncated),
        }
    }
}

async fn accept(listener: TcpListener, target: SocketAddr, control: Arc<Control>) {
    loop {
        let inbound = match listener.accept().await {
            Ok((socket, _)) => socket,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        if control.faults().cut == Some(Cut::Both) {
            control.stats.refused.fetch_add(1, Ordering::Relaxed);
            drop(inbound);
            continue;
        }
        control.stats.connections.fetch_add(1, Ordering::Relaxed);
        let rng = Rng::new(control.next_seed());
        tokio::spawn(connection(inbound, target, control.clone(), rng));
    }
}

/// Forwards one connection until either side closes, a fault closes it, or a partition cuts it.
async fn connection(inbound: TcpStream, target: SocketAddr, control: Arc<Control>, mut rng: Rng) {
    let Ok(Ok(outbound)) = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await
    else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    let poisoned = [AtomicBool::new(false), AtomicBool::new(false)];
    let mut changed = control.changed.subscribe();
    let forward = pump(
        in_read,
        out_write,
        Direction::DialerToListener,
        &control,
        rng.fork(),
        &poisoned[0],
    );
    let backward = pump(
        out_read,
        in_write,
        Direction::ListenerToDialer,
        &control,
        rng.fork(),
        &poisoned[1],
    );
    tokio::pin!(forward, backward);
    loop {
        tokio::select! {
            _ = &mut forward => return,
            _ = &mut backward => return,
            changed = changed.changed() => {
                if changed.is_err() {
                    return;
                }
                let cut = control.faults().cut;
                let one_way = matches!(cut, Some(Cut::OneWay(_)));
                let dropped = poisoned.iter().any(|p| p.load(Ordering::Relaxed));
                if cut == Some(Cut::Both) || (dropped && !one_way) {
                    control.stats.closed_by_partition.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    }
}

/// Reads one frame, with its length prefix. `None` at a clean end of stream.
async fn read_frame(reader: &mut OwnedReadHalf) -> io::Result<Option<Vec<u8>>> {
    let mut prefix = [0u8; 4];
    match reader.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len > driftless_wire::FRAME_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    let mut frame = Vec::with_capacity(4 + len);
    frame.extend_from_slice(&prefix);
    frame.resize(4 + len, 0);
    reader.read_exact(&mut frame[4..]).await?;
    Ok(Some(frame))
}

/// Moves frames one way, injecting the link's current faults. Returns when the connection
/// should close.
async fn pump(
    mut reader: OwnedReadHalf,
    mut writer: OwnedWriteHalf,
    direction: Direction,
    control: &Control,
    mut rng: Rng,
    poisoned: &AtomicBool,
) {
    let stats = &control.stats;
    let mut held: Option<Vec<u8>> = None;
    loop {
        let read = match &held {
            None => read_frame(&mut reader).await,
            Some(_) => {
                match tokio::time::timeout(REORDER_HOLD_MAX, read_frame(&mut reader)).await {
                    Ok(read) => read,
                    Err(_) => {
                        let frame = held.take().expect("held");
                        if writer.write_all(&frame).await.is_err() {
                            return;
                        }
                        continue;
                    }
                }
            }
        };
        let frame = match read {
            Ok(Some(frame)) => frame,
            _ => {
                if let Some(frame) = held.take() {
                    let _ = writer.write_all(&frame).await;
                }
                return;
            }
        };
        stats.frames.fetch_add(1, Ordering::Relaxed);
        let faults = control.faults();
        match faults.cut {
            Some(Cut::Both) => return,
            Some(Cut::OneWay(d)) if d == direction => poisoned.store(true, Ordering::Relaxed),
            _ => {}
        }
        if poisoned.load(Ordering::Relaxed) {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let noise = faults.noise;
        if noise.delay_ms_max > 0 {
            stats.delayed.fetch_add(1, Ordering::Relaxed);
            let ms = rng.range(0, noise.delay_ms_max);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if rng.percent(noise.truncate_percent) {
            stats.truncated.fetch_add(1, Ordering::Relaxed);
            let cut_at = 1 + rng.index(frame.len() - 1);
            let _ = writer.write_all(&frame[..cut_at]).await;
            return;
        }
        if held.is_none() && rng.percent(noise.reorder_percent) {
            held = Some(frame);
            continue;
        }
        if writer.write_all(&frame).await.is_err() {
            return;
        }
        if let Some(earlier) = held.take() {
            stats.reordered.fetch_add(1, Ordering::Relaxed);
            if writer.write_all(&earlier).await.is_err() {
                return;
            }
        }
        if rng.percent(noise.duplicate_percent) {
            stats.duplicated.fetch_add(1, Ordering::Relaxed);
            if writer.write_all(&frame).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    fn frame(byte: u8, len: usize) -> Vec<u8> {
        let mut f = (len as u32).to_be_bytes().to_vec();
        f.extend(std::iter::repeat_n(byte, len));
        f
    }

    /// A listener that echoes every byte back.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = socket.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn read_n(stream: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        let got =
            tokio::time::timeout(Duration::from_millis(500), stream.read_exact(&mut buf)).await;
        match got {
            Ok(Ok(_)) => buf,
            _ => Vec::new(),
        }
    }

    #[tokio::test]
    async fn frames_pass_then_a_one_way_cut_drops_one_direction_only() {
        let proxy = Proxy::start(any(), echo().await, 1).await.expect("proxy");
        let mut client = TcpStream::connect(proxy.addr).await.expect("connect");
        client.write_all(&frame(1, 10)).await.expect("write");
        assert_eq!(read_n(&mut client, 14).await, frame(1, 10));
        // Frames from the listener back to the dialer are dropped: nothing comes back.
        proxy.set_cut(Some(Cut::OneWay(Direction::ListenerToDialer)));
        client.write_all(&frame(2, 10)).await.expect("write");
        assert_eq!(read_n(&mut client, 14).await, Vec::<u8>::new());
        assert_eq!(proxy.counts().dropped, 1);
        // Healing closes the connection that lost a frame; a new one works.
        proxy.set_cut(None);
        let mut client = TcpStream::connect(proxy.addr).await.expect("connect");
        client.write_all(&frame(3, 5)).await.expect("write");
        assert_eq!(read_n(&mut client, 9).await, frame(3, 5));
    }

    #[tokio::test]
    async fn duplication_and_reordering_act_on_whole_frames() {
        let proxy = Proxy::start(any(), echo().await, 2).await.expect("proxy");
        proxy.set_noise(Noise {
            duplicate_percent: 100,
            ..Noise::default()
        });
        let mut client = TcpStream::connect(proxy.addr).await.expect("connect");
        client.write_all(&frame(1, 3)).await.expect("write");
        // Duplicated on the way there and again on the way back: four copies.
        let got = read_n(&mut client, 4 * 7).await;
        assert_eq!(got, frame(1, 3).repeat(4));
        proxy.set_noise(Noise {
            reorder_percent: 100,
            ..Noise::default()
        });
        let mut client = TcpStream::connect(proxy.addr).await.expect("connect");
        client.write_all(&frame(1, 3)).await.expect("write");
        client.write_all(&frame(2, 3)).await.expect("write");
        let got = read_n(&mut client, 14).await;
        assert_eq!(got.len(), 14);
        assert!(proxy.counts().reordered >= 1);
    }

    #[tokio::test]
    async fn a_partition_refuses_new_connections_and_truncation_cuts_mid_frame() {
        let proxy = Proxy::start(any(), echo().await, 3).await.expect("proxy");
        proxy.set_cut(Some(Cut::Both));
        let mut client = TcpStream::connect(proxy.addr).await.expect("connect");
        client.write_all(&frame(1, 3)).await.ok();
        assert_eq!(read_n(&mut client, 7).await, Vec::<u8>::new());
        proxy.set_cut(None);
        proxy.set_noise(Noise {
            truncate_percent: 100,
            ..Noise::default()
        });
        let mut client = TcpStream::connect(proxy.addr).await.expect("connect");
        client.write_all(&frame(9, 100)).await.expect("write");
        let mut all = Vec::new();
        let _ =
            tokio::time::timeout(Duration::from_millis(500), client.read_to_end(&mut all)).await;
        assert!(
            all.len() < 104,
            "the frame was cut: {} bytes came back",
            all.len()
        );
        assert!(proxy.counts().truncated >= 1);
    }
}
