use super::*;
use std::io::Write;

fn ring_of(world: usize, ids: impl Fn(usize) -> RingId, timeout: Duration) -> Vec<Result<TcpRing>> {
    let listeners: Vec<TcpListener> = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    std::thread::scope(|s| {
        let hs: Vec<_> = listeners
            .iter()
            .enumerate()
            .map(|(r, l)| {
                let addrs = &addrs;
                let id = ids(r);
                s.spawn(move || TcpRing::connect(r, addrs, l, id, timeout))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn id(len: usize) -> RingId {
    RingId {
        run_tag: run_tag("run"),
        generation: 1,
        buffer_len: len,
        secret: [7; 32],
    }
}

#[test]
fn chunks_cover_the_buffer() {
    for len in [0, 1, 5, 7, 100] {
        for w in 1..6 {
            let mut next = 0;
            for c in 0..w {
                let r = chunk_range(len, w, c);
                assert_eq!(r.start, next);
                next = r.end;
            }
            assert_eq!(next, len);
        }
    }
}

#[test]
fn every_rank_gets_the_same_exact_sum() {
    for world in [1, 2, 3, 4] {
        for len in [1usize, 2, 7, 1000] {
            let rings = ring_of(world, |_| id(len), Duration::from_secs(10));
            let results: Vec<Vec<f64>> = std::thread::scope(|s| {
                let hs: Vec<_> = rings
                    .into_iter()
                    .enumerate()
                    .map(|(r, ring)| {
                        s.spawn(move || {
                            let mut ring = ring.unwrap();
                            let mut buf: Vec<f64> =
                                (0..len).map(|i| (i * 10 + r) as f64 * 0.5).collect();
                            for _ in 0..3 {
                                ring.all_reduce_sum(&mut buf).unwrap();
                            }
                            buf
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            // Three successive sums: world² · x after 2 more rounds → world³ · base.
            for (i, v) in results[0].iter().enumerate() {
                let once: f64 = (0..world).map(|r| (i * 10 + r) as f64 * 0.5).sum();
                let expect = once * (world * world) as f64;
                assert!(
                    (v - expect).abs() <= 1e-4 * expect.abs().max(1.0),
                    "{v} vs {expect}"
                );
            }
            for r in &results {
                assert_eq!(r, &results[0], "ranks agree bitwise");
            }
        }
    }
}

#[test]
fn wrong_buffer_size_is_rejected_and_leaves_the_buffer_alone() {
    // At setup: a peer that announces another length.
    let rings = ring_of(
        2,
        |r| id(if r == 0 { 10 } else { 11 }),
        Duration::from_secs(5),
    );
    let errs: Vec<String> = rings
        .into_iter()
        .filter_map(|r| r.err().map(|e| format!("{e:#}")))
        .collect();
    assert!(
        errs.iter().any(|e| e.contains("wrong buffer size")),
        "{errs:?}"
    );
    // At call time: a buffer of another length than the ring's.
    let mut rings = ring_of(1, |_| id(4), Duration::from_secs(5));
    let mut ring = rings.pop().unwrap().unwrap();
    let mut buf = vec![1.0f64; 5];
    let e = ring.all_reduce_sum(&mut buf).unwrap_err();
    assert!(format!("{e}").contains("wrong buffer size"));
    assert_eq!(buf, vec![1.0; 5]);
}

#[test]
fn stale_generation_and_other_runs_are_rejected() {
    let rings = ring_of(
        2,
        |r| RingId {
            generation: if r == 0 { 2 } else { 1 },
            ..id(8)
        },
        Duration::from_secs(5),
    );
    let errs: Vec<String> = rings
        .into_iter()
        .filter_map(|r| r.err().map(|e| format!("{e:#}")))
        .collect();
    assert!(
        errs.iter().any(|e| e.contains("stale generation")),
        "{errs:?}"
    );
    let rings = ring_of(
        2,
        |r| RingId {
            run_tag: run_tag(if r == 0 { "a" } else { "b" }),
            ..id(8)
        },
        Duration::from_secs(5),
    );
    let errs: Vec<String> = rings
        .into_iter()
        .filter_map(|r| r.err().map(|e| format!("{e:#}")))
        .collect();
    assert!(errs.iter().any(|e| e.contains("wrong run id")), "{errs:?}");
}

#[test]
fn a_silent_peer_times_out_and_the_buffer_is_unchanged() {
    let rings = ring_of(2, |_| id(16), Duration::from_millis(300));
    let mut rings: Vec<TcpRing> = rings.into_iter().map(|r| r.unwrap()).collect();
    let _silent = rings.pop().unwrap();
    let mut ring = rings.pop().unwrap();
    let mut buf = vec![3.0f64; 16];
    let t = Instant::now();
    let e = ring.all_reduce_sum(&mut buf).unwrap_err();
    assert!(format!("{e:#}").contains("timed out"), "{e:#}");
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(buf, vec![3.0; 16]);
    let again = ring.all_reduce_sum(&mut buf).unwrap_err();
    assert!(format!("{again:#}").contains("unusable"), "{again:#}");
}

/// Rank `r`'s test values: sums of these depend on the order of the additions.
fn values(r: usize, len: usize) -> Vec<f64> {
    (0..len)
        .map(|i| {
            let k = (i as u64).wrapping_mul(2_654_435_761) ^ (r as u64 + 1).wrapping_mul(97);
            (k % 1_000_003) as f64 * 1e-3 + 1.0 / (r + i + 1) as f64
        })
        .collect()
}

/// The sum the ring defines: chunk `c` starts at rank `c` and gathers each following
/// rank's value in ring order, `x[c+w−1] + (… + (x[c+1] + x[c]))`.
fn ring_order_sum(world: usize, len: usize) -> Vec<f64> {
    let xs: Vec<Vec<f64>> = (0..world).map(|r| values(r, len)).collect();
    let mut out = vec![0.0; len];
    for c in 0..world {
        for i in chunk_range(len, world, c) {
            let mut acc = xs[c][i];
            for j in 1..world {
                // The rank's own value plus the partial sum that arrived (IEEE addition
                // commutes bitwise; the order that matters is the ring's).
                acc += xs[(c + j) % world][i];
            }
            out[i] = acc;
        }
    }
    out
}

fn run_all(rings: Vec<TcpRing>, len: usize) -> Vec<Result<Vec<f64>>> {
    std::thread::scope(|s| {
        let hs: Vec<_> = rings
            .into_iter()
            .enumerate()
            .map(|(r, mut ring)| {
                s.spawn(move || {
                    let mut buf = values(r, len);
                    ring.all_reduce_sum(&mut buf).map(|_| buf)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn the_sum_is_bitwise_the_ring_order_sum_across_segments() {
    let mut order_mattered = false;
    for world in [2, 3, 4] {
        for len in [
            1usize,
            3,
            7,
            SEGMENT - 1,
            2 * SEGMENT + 3,
            world * SEGMENT + 5,
        ] {
            let rings: Vec<TcpRing> = ring_of(world, |_| id(len), Duration::from_secs(20))
                .into_iter()
                .map(|r| r.unwrap())
                .collect();
            let expect = ring_order_sum(world, len);
            for (r, got) in run_all(rings, len).into_iter().enumerate() {
                let got = got.unwrap();
                for i in 0..len {
                    assert_eq!(
                        got[i].to_bits(),
                        expect[i].to_bits(),
                        "world {world} len {len} rank {r} value {i}: {} vs {}",
                        got[i],
                        expect[i]
                    );
                }
            }
            let xs: Vec<Vec<f64>> = (0..world).map(|r| values(r, len)).collect();
            let naive: Vec<f64> = (0..len).map(|i| xs.iter().map(|x| x[i]).sum()).collect();
            order_mattered |= naive.iter().zip(&expect).any(|(a, b)| a != b);
        }
    }
    assert!(
        order_mattered,
        "the test values should make the order of additions visible"
    );
}

#[test]
fn aborting_a_blocked_rank_returns_at_once_with_the_aborted_error() {
    // Rank 2 joins and then stops participating; ranks 0 and 1 block in their call. A
    // 30 s timeout means only the abort can end rank 0's call within the 5 s bound.
    let len = 3 * SEGMENT;
    let mut rings: Vec<TcpRing> = ring_of(3, |_| id(len), Duration::from_secs(30))
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let silent = rings.pop().unwrap();
    let aborter = rings[0].aborter();
    let (e0, e1, took0, took1) = std::thread::scope(|s| {
        let hs: Vec<_> = rings
            .iter_mut()
            .enumerate()
            .map(|(r, ring)| {
                s.spawn(move || {
                    let mut buf = values(r, len);
                    let before = buf.clone();
                    let e = ring.all_reduce_sum(&mut buf).unwrap_err();
                    assert_eq!(buf, before, "a failed call leaves the buffer alone");
                    (e, Instant::now())
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        aborter.abort();
        let mut out = hs.into_iter().map(|h| h.join().unwrap());
        let (e0, at0) = out.next().unwrap();
        let (e1, at1) = out.next().unwrap();
        (e0, e1, at0.duration_since(t), at1.duration_since(t))
    });
    eprintln!("after abort: rank 0 returned in {took0:?}, rank 1 in {took1:?}");
    let (e0, e1) = (format!("{e0:#}"), format!("{e1:#}"));
    assert!(e0.contains("was aborted"), "{e0}");
    assert!(took0 < Duration::from_secs(5), "rank 0 hung: {took0:?}");
    // Rank 1 sees its predecessor's connection close: a peer failure, not an abort.
    assert!(
        e1.contains("peer failure") && !e1.contains("aborted"),
        "{e1}"
    );
    assert!(took1 < Duration::from_secs(5), "rank 1 hung: {took1:?}");
    // Later calls fail at once, and still say why.
    let mut buf = values(0, len);
    let again = format!("{:#}", rings[0].all_reduce_sum(&mut buf).unwrap_err());
    assert!(again.contains("was aborted"), "{again}");
    drop(silent);
}

#[test]
fn an_abort_before_a_call_makes_it_fail_without_touching_the_peers() {
    let mut rings: Vec<TcpRing> = ring_of(2, |_| id(8), Duration::from_secs(30))
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    rings[1].aborter().abort();
    let mut buf = vec![1.0; 8];
    let e = format!("{:#}", rings[1].all_reduce_sum(&mut buf).unwrap_err());
    assert!(e.contains("was aborted"), "{e}");
    assert_eq!(buf, vec![1.0; 8]);
    // Its neighbour learns at once that the connections closed.
    let e = format!("{:#}", rings[0].all_reduce_sum(&mut buf).unwrap_err());
    assert!(e.contains("peer failure"), "{e}");
}

#[test]
fn a_peer_that_dies_gives_a_peer_error_quickly() {
    let len = 3 * SEGMENT + 1;
    let mut rings: Vec<TcpRing> = ring_of(3, |_| id(len), Duration::from_secs(30))
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    // The dead rank's aborter outlives it, holding clones of its sockets: dropping the
    // ring must close the connections all the same.
    let dead = rings.pop().unwrap();
    let _kept = dead.aborter();
    drop(dead);
    let t = Instant::now();
    let results = run_all(rings, len);
    let took = t.elapsed();
    eprintln!("both survivors failed within {took:?}");
    assert!(took < Duration::from_secs(5), "hung: {took:?}");
    for (r, res) in results.into_iter().enumerate() {
        let e = format!("{:#}", res.unwrap_err());
        assert!(
            e.contains("peer failure") && !e.contains("aborted") && !e.contains("timed out"),
            "rank {r}: {e}"
        );
    }
}

#[test]
fn a_stranger_on_the_ring_port_is_refused_counted_and_the_ring_still_forms() {
    let listeners: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    // Strangers reach rank 0's port first: one sends garbage, one a well-formed hello
    // with a guessed secret's proof (it cannot answer the acceptor's nonce).
    let mut garbage = std::net::TcpStream::connect(addrs[0]).unwrap();
    garbage.write_all(&[0xAB; 200]).unwrap();
    let guesser = std::thread::spawn({
        let a = addrs[0];
        move || {
            let mut s = std::net::TcpStream::connect(a).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            gpo_ops::ring_auth::dial(&mut s, b"guessed", &[0u8; HELLO_LEN])
        }
    });
    let failures = gpo_ops::auth::AuthFailures::default();
    let rings: Vec<Result<TcpRing>> = std::thread::scope(|s| {
        let hs: Vec<_> = listeners
            .iter()
            .enumerate()
            .map(|(r, l)| {
                let (addrs, f) = (&addrs, &failures);
                s.spawn(move || {
                    // The real predecessor of rank 0 dials only after the strangers.
                    if r == 1 {
                        std::thread::sleep(Duration::from_millis(300));
                    }
                    TcpRing::connect_with(r, addrs, l, id(8), Duration::from_secs(10), f)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(guesser.join().unwrap().is_err(), "the guesser got in");
    let mut rings: Vec<TcpRing> = rings.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(failures.count(gpo_ops::auth::reason::RING_HANDSHAKE), 2);
    let sums: Vec<Vec<f64>> = std::thread::scope(|s| {
        let hs: Vec<_> = rings
            .iter_mut()
            .enumerate()
            .map(|(r, ring)| {
                s.spawn(move || {
                    let mut b = vec![r as f64 + 1.0; 8];
                    ring.all_reduce_sum(&mut b).unwrap();
                    b
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(sums, vec![vec![3.0; 8]; 2]);
}

#[test]
fn members_with_another_secret_do_not_form_a_ring() {
    let rings = ring_of(
        2,
        |r| RingId {
            secret: [r as u8; 32],
            ..id(8)
        },
        Duration::from_secs(2),
    );
    let errs: Vec<String> = rings
        .into_iter()
        .filter_map(|r| r.err().map(|e| format!("{e:#}")))
        .collect();
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(
        errs.iter()
            .any(|e| e.contains("ring secret") || e.contains("not rank")),
        "{errs:?}"
    );
}

#[test]
fn bytes_sent_counts_the_values_and_headers_each_member_writes() {
    // World 2, 1000 values: each call sends one 500-value chunk in the reduce-scatter and
    // one in the all-gather, each chunk one segment with its header.
    let rings = ring_of(2, |_| id(1000), Duration::from_secs(10));
    let sent: Vec<u64> = std::thread::scope(|s| {
        let hs: Vec<_> = rings
            .into_iter()
            .map(|ring| {
                s.spawn(move || {
                    let mut ring = ring.unwrap();
                    assert_eq!(ring.bytes_sent(), 0);
                    let mut buf = vec![1.0f64; 1000];
                    for _ in 0..3 {
                        ring.all_reduce_sum(&mut buf).unwrap();
                    }
                    ring.bytes_sent()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let per_call = 2 * (500 * 8 + HEADER_LEN as u64);
    assert_eq!(sent, vec![3 * per_call, 3 * per_call]);
}
