import json, struct, io, tarfile, os, zlib, glob, shutil
def d(name): os.makedirs(name, exist_ok=True); return name
MAN='''{
  "format": "butler-shards", "version": 1, "name": "t", "sample_shape": [1, 3, 3], "dtype": "f32",
  "classes": ["a", "b", "c"],
  "splits": {
    "train": {"num_samples": 3, "labeled": true, "class_counts": [1, 1, 1],
              "shards": [{"path": "train-00000.safetensors", "num_samples": 3, "sha256": "00", "first_id": 0}]},
    "pool": {"num_samples": 2, "labeled": false,
             "shards": [{"path": "pool-00000.tar", "format": "tar", "num_samples": 2, "sha256": "00", "first_id": 3}]}
  },
  "source": {"generator": "test"}
}'''
open(d('manifest')+'/valid.json','w').write(MAN)
def st(tensors, meta=None):
    hdr={}; off=0; blobs=[]
    for name,(dt,shape,data) in tensors.items():
        hdr[name]={"dtype":dt,"shape":shape,"data_offsets":[off,off+len(data)]}; off+=len(data); blobs.append(data)
    if meta: hdr["__metadata__"]=meta
    h=json.dumps(hdr,separators=(',',':')).encode()
    h+=b' '*((8-len(h)%8)%8)
    return struct.pack('<Q',len(h))+h+b''.join(blobs)
for n in (1,2,3):
    x=struct.pack('<%df'%(3*n),*[float(i) for i in range(3*n)])
    ids=struct.pack('<%dQ'%n,*range(100,100+n)); y=struct.pack('<%dq'%n,*[i%3 for i in range(n)])
    b=st({"x":("F32",[n,3],x),"id":("U64",[n],ids),"y":("I64",[n],y)})
    open(d('shard_safetensors')+f'/n{n}.bin','wb').write(bytes([0x10|n])+b)
    open('shard_safetensors'+f'/n{n}-unlabeled-skip.bin','wb').write(bytes([0x20|n])+b)
def chunk(t,data): return struct.pack('>I',len(data))+t+data+struct.pack('>I',zlib.crc32(t+data))
def png(seed, color=0):
    c=3 if color==2 else 1
    raw=b''.join(b'\0'+bytes(((i*3+j)*37+seed)%256 for j in range(3) for _ in range(c)) for i in range(3))
    return b'\x89PNG\r\n\x1a\n'+chunk(b'IHDR',struct.pack('>IIBBBBB',3,3,8,color,0,0,0))+chunk(b'IDAT',zlib.compress(raw))+chunk(b'IEND',b'')
for n in (1,2):
    f=io.BytesIO(); t=tarfile.open(fileobj=f,mode='w',format=tarfile.USTAR_FORMAT)
    for i in range(n):
        for name,data in ((f'{i:04}.png', png(i)),(f'{i:04}.cls',str(i%3).encode())):
            ti=tarfile.TarInfo(name); ti.size=len(data); t.addfile(ti,io.BytesIO(data))
    t.close()
    open(d('shard_tar')+f'/n{n}.bin','wb').write(bytes([0x10|n])+f.getvalue())
f=io.BytesIO(); t=tarfile.open(fileobj=f,mode='w',format=tarfile.USTAR_FORMAT)
for name,data in (('a/0.png',png(1,2)),('a/0.cls',b'1')):
    ti=tarfile.TarInfo(name); ti.size=len(data); t.addfile(ti,io.BytesIO(data))
t.close(); open('shard_tar/rgb-wrong-shape.bin','wb').write(bytes([0x31])+f.getvalue())
for n,k,probs in ((1,2,False),(3,3,True)):
    T={"id":("U64",[n],struct.pack('<%dQ'%n,*range(n))),"class":("U32",[n],struct.pack('<%dI'%n,*[i%k for i in range(n)])),
       "confidence":("F32",[n],struct.pack('<%df'%n,*[0.9]*n)),"margin":("F32",[n],struct.pack('<%df'%n,*[2.3]*n))}
    if probs: T["probs"]=("F32",[n,k],struct.pack('<%df'%(n*k),*[1.0/k]*(n*k)))
    open(d('sidecar')+f'/n{n}k{k}.bin','wb').write(st(T,{"classes":str(k)}))
d('config')
for p in sorted(glob.glob('../../examples/*.toml'))[:8]: shutil.copy(p,'config/')
commit={"checkpoint":"checkpoints/step-000000010.safetensors","sha256":"ab"*32,"bytes":1234,"step":10,"epoch":1,"steps_in_epoch":0,
        "labeled_start":0,"unlabeled":[0,10],"world_size":2,"generation":1,"stage":0,"round":0}
open(d('commits_state')+'/valid.json','w').write(json.dumps({"format":1,"job":"j","config":"cfg","generation":1,"world_size":2,"commits":[commit,dict(commit,step=20,checkpoint="checkpoints/round-1-step-000000020.safetensors",round=1)]},indent=2))
B=1000
hist={"classes":2,"counts":[0]*(2*B),"below":[1,0]}; hist["counts"][900]=2; hist["counts"][B+500]=1
sel={"round":1,"threshold":0.5,"bins":B,"min_bin":[900,1000],"selected":[2,0],"predicted":[3,1]}
open(d('rounds_state')+'/infer.json','w').write(json.dumps({"round":1,"phase":"infer","done":[0],"histograms":{"0":hist},"selections":[sel],"round_accuracy":[0.5,0.75]}))
open('rounds_state/train.json','w').write(json.dumps({"round":0,"phase":"train","done":[],"histograms":{},"selections":[],"round_accuracy":[]}))
d('tb_events'); shutil.copy('../../coordinator/tests/fixtures/torch.tfevents','tb_events/torch.tfevents')
d('proto')
for i in range(23): open(f'proto/m{i:02}.bin','wb').write(bytes([i]))
for i in (0,7,10,19):
    open(f'proto/m{i:02}-fields.bin','wb').write(bytes([i,0x08,0x07,0x12,0x03])+b'abc')
d('checkpoint')
meta=json.dumps({"format":1,"job":"j","step":12,"epoch":1,"steps_in_epoch":2,"labeled_start":16,"unlabeled":[0,12],
  "world_size":2,"generation":1,"epoch_losses":[[1.5,8.0],[1.25,8.0]],"stage":0,"history":[0.5],"round":0,
  "unlabeled_periods":[[2,[12,12]]]}).encode()
w=struct.pack('<2f',0.5,-0.5)
open('checkpoint/valid.safetensors','wb').write(st({"ema.0":("F32",[2],w),"meta":("U8",[len(meta)],meta),"model.fc.weight":("F32",[2],w),"optim.0.exp_avg":("F32",[2],w)}))
open('checkpoint/meta.json','wb').write(meta)
