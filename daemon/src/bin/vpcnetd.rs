fn main() {
    println!("{}", vpcnet_daemon::ebpf_object::BYTES.len());
}
