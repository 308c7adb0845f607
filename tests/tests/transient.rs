//! Files created and removed between two CPs never reach the image (the CP leaves their
//! records out, `proto::replay::drop_transient`), while the files around them, written in the
//! same window, arrive with their exact contents: leaving records out must not shift any
//! write's payload onto another record.

use nvmirror_e2e::{require_mount, Harness, HarnessOptions};
use std::fs;

#[test]
fn temporary_files_are_left_out_and_their_neighbours_keep_their_contents() {
    const TEST: &str = "transient_files";
    require_mount!(TEST);
    let h = Harness::start(HarnessOptions::new(TEST));
    let m = h.mnt();
    fs::create_dir(m.join("d")).expect("mkdir d");
    let mut kept = Vec::new();
    for i in 0..20u32 {
        let tmp = m.join(format!("d/tmp{i}"));
        fs::write(&tmp, vec![i as u8; 5000 + i as usize]).expect("write tmp");
        let body: Vec<u8> = (0..7000 + i).map(|b| (b * 7 + i) as u8).collect();
        fs::write(m.join(format!("d/keep{i}")), &body).expect("write keep");
        kept.push(body);
        fs::remove_file(&tmp).expect("unlink tmp");
    }
    // A hard-linked temporary: its data must survive under the other name.
    fs::write(m.join("d/linked"), b"linked data").expect("write linked");
    fs::hard_link(m.join("d/linked"), m.join("d/other")).expect("link");
    fs::remove_file(m.join("d/linked")).expect("unlink linked");
    h.cp();
    let image = h.image();
    for (i, body) in kept.iter().enumerate() {
        let got = fs::read(image.join(format!("d/keep{i}"))).expect("keep in the image");
        assert_eq!(&got, body, "keep{i}'s content in the image");
        assert!(
            !image.join(format!("d/tmp{i}")).exists(),
            "tmp{i} is not in the image"
        );
    }
    assert_eq!(
        fs::read(image.join("d/other")).expect("other in the image"),
        b"linked data",
        "a temporary with a second name keeps its data"
    );
    assert!(!image.join("d/linked").exists(), "linked was removed");
    let s = h.dest_source_status("alpha");
    assert!(
        s["transient_records"].as_u64().unwrap_or(0) >= 20 * 3,
        "the CP left the temporaries' records out: {s}"
    );
}
