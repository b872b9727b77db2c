use tandem_kernels::quant::dequantize_row;
use tandem_kernels::{GgmlType, Weights};

fn u32_at(b: &[u8], at: &mut usize) -> usize {
    let v = u32::from_le_bytes(b[*at..*at + 4].try_into().unwrap()) as usize;
    *at += 4;
    v
}

#[test]
fn llama_cpp_fixtures() {
    let b = std::fs::read("/tmp/kern-fx/cases.bin").unwrap();
    let mut at = 0;
    let n = u32_at(&b, &mut at);
    for _ in 0..n {
        let nl = u32_at(&b, &mut at);
        let tid = u32_at(&b, &mut at) as u32;
        let rows = u32_at(&b, &mut at);
        let cols = u32_at(&b, &mut at);
        let len = u32_at(&b, &mut at);
        let name = String::from_utf8(b[at..at + nl].to_vec()).unwrap();
        at += nl;
        let raw = &b[at..at + len];
        at += len;
        let want: Vec<f32> =
            b[at..at + 4 * rows * cols].chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        at += 4 * rows * cols;
        let t = GgmlType::from_id(tid).unwrap();
        let mut got = vec![0f32; rows * cols];
        dequantize_row(t, raw, &mut got);
        let bad =
            got.iter().zip(&want).filter(|(g, w)| g.to_bits() != w.to_bits() && !(**g == 0.0 && **w == 0.0)).count();
        let w = Weights::from_ggml(t, raw, rows, cols).unwrap();
        let mut packed = vec![0f32; cols];
        let (mut pbad, mut maxerr, mut maxval) = (0, 0f32, 0f32);
        for r in 0..rows {
            w.dequantize_row(r, &mut packed);
            for c in 0..cols {
                let wv = want[r * cols + c];
                if packed[c] != wv {
                    pbad += 1;
                }
                maxerr = maxerr.max((packed[c] - wv).abs());
                maxval = maxval.max(wv.abs());
            }
        }
        println!("{name} {}: reference mismatches {bad}/{}, repacked differing {pbad}, max err {maxerr:e} (max |w| {maxval})", t.name(), rows * cols);
        assert_eq!(bad, 0, "{name}");
        if t != GgmlType::Q6_K {
            assert_eq!(pbad, 0, "{name}");
        }
    }
}
