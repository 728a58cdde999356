for mm in default 0.1 0; do for s in 0 1 2 3 4; do
  flag=""; [ "$mm" != default ] && flag="--max-move $mm"
  rm -rf /tmp/ek; python examples/cnn.py --optim ekfac --num-train 3000 --num-epochs 3 --threads 1 --no-progress --seed $s $flag --out /tmp/ek > /dev/null 2>&1
  python3 -c "import json; m=json.load(open('/tmp/ek/metrics.json')); print('max_move $mm seed $s', round(m[-1]['train_loss'],3), m[-1]['test_accuracy'])"
done; done
